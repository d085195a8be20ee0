"""Values put into markdown (the Prefect UI's artifacts), escaped so that none can leave
the place it is put in: a line of text, a table cell, a code span or a code block.

Artifacts show a run's input (a work_dir, a checkpoint path, the resolved config), and
whoever fills in the UI's run form chooses it: a value with a newline and three backticks
would otherwise close its code block and add headings and links of its own. The rules
are CommonMark's (and GitHub's for table cells), which the UI's renderer follows.
"""

import re

# Control characters: shown as Python escapes (a newline as \n) wherever a value must stay
# on one line. A bare carriage return ends a line in CommonMark, as a newline does.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Every ASCII punctuation character may be escaped with a backslash in CommonMark, and
# escaped it is only itself: no emphasis, link, HTML, heading or table pipe.
_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")
_BACKTICKS = re.compile(r"`+")


def one_line(value: object) -> str:
    """``value`` as text with its control characters shown as escapes (``\\n``)."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(value))


def text(value: object) -> str:
    """``value`` as literal text on one line: every punctuation character escaped."""
    return _PUNCTUATION.sub(r"\\\1", one_line(value))


def table_cell(value: object) -> str:
    """``value`` as the literal content of one table cell (its pipes escaped too)."""
    return text(value)


def inline_code(value: object) -> str:
    """``value`` on one line as a code span, delimited by more backticks than it holds."""
    content = one_line(value)
    ticks = "`" * (_longest_backtick_run(content) + 1)
    # A span that starts or ends with a backtick or a space needs a space inside each
    # delimiter; CommonMark strips exactly one from each side.
    if content[:1] in ("`", " ") or content[-1:] in ("`", " "):
        content = f" {content} "
    return f"{ticks}{content}{ticks}"


def code_block(value: object, language: str = "") -> str:
    """``value`` as a fenced code block whose fence is longer than any backtick run in it,
    so no line of ``value`` can close it."""
    content = str(value)
    fence = "`" * max(3, _longest_backtick_run(content) + 1)
    return f"{fence}{language}\n{content}\n{fence}"


def _longest_backtick_run(content: str) -> int:
    return max((len(run) for run in _BACKTICKS.findall(content)), default=0)
