"""The error a training run stops with: one line that says what happened and what was kept."""


class TrainingError(RuntimeError):
    pass
