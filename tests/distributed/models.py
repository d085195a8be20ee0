"""Models for the distributed tests (configs reach them because the suite trusts ``tests``)."""

from torch.nn import functional

from baton.models import MLP


class StepMLP(MLP):
    """An MLP with mmengine's ``train_step``: it trains itself given the optimizer wrapper."""

    def train_step(self, data, optim_wrapper):
        inputs, targets = data
        with optim_wrapper.optim_context(self):
            loss = functional.cross_entropy(self(inputs), targets)
        optim_wrapper.update_params(loss)
        return {"loss": loss}
