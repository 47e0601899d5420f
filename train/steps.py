"""What a training step reports, the same on every engine: the number of correct
predictions, and NonFiniteLoss when the loss is NaN or infinite. Both engines import it;
it imports nothing of train/."""


class NonFiniteLoss(Exception):
    """The loss of a step was NaN or infinite; `applied` says whether the engine had
    already applied that step (an IPU has, by the time the loss reaches the host)."""

    def __init__(self, loss, applied=False):
        super().__init__(f"loss is {loss}")
        self.loss, self.applied = loss, applied


def count_correct(logits, targets):
    """Predictions equal to the label: targets are class indices or class probabilities
    (mixup), whose largest is the label."""
    labels = targets.argmax(dim=1) if targets.dim() == 2 else targets
    return (logits.argmax(dim=1) == labels).sum()
