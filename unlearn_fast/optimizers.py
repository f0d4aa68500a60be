"""The optimizer classes a stored history may name: an allow-list, never an import of a string from a file.

A history records its optimizer as text (f"{module}.{qualname}", e.g. "torch.optim.sgd.SGD") so that
`retrain` can rebuild it. A crafted history could name any callable ("os.system"); so the name is only
looked up here: every torch.optim optimizer is known under its public and its defining-module spelling
("torch.optim.SGD", "torch.optim.sgd.SGD"), and any other class must be registered by the user with
register_optimizer(cls) before such a history is replayed.
"""
import torch

_ALLOWED = {}  # recorded name -> optimizer class


def _name(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


def register_optimizer(cls):
    """Allow histories recorded with optimizer class `cls` (a torch.optim.Optimizer subclass) to be
    replayed; returns cls, so it works as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer):
        raise ValueError(f"register_optimizer: cls must be a subclass of torch.optim.Optimizer, got {cls!r}")
    _ALLOWED[_name(cls)] = cls
    return cls


def optimizer_class(name):
    """The allowed optimizer class recorded as `name`; ValueError naming it otherwise (nothing is imported)."""
    if not isinstance(name, str) or name not in _ALLOWED:
        raise ValueError(
            f"history: optimizer class {name!r:.200} is not allowed: a history can name only torch.optim optimizers "
            f"and classes registered with unlearn_fast.optimizers.register_optimizer(cls) before the history is used"
        )
    return _ALLOWED[name]


for _cls in vars(torch.optim).values():
    if isinstance(_cls, type) and issubclass(_cls, torch.optim.Optimizer) and _cls is not torch.optim.Optimizer:
        register_optimizer(_cls)
        _ALLOWED[f"torch.optim.{_cls.__name__}"] = _cls


def cycled_setting(optimizer):
    """The setting a momentum-cycling scheduler (OneCycleLR, CyclicLR with cycle_momentum=True) changes every step:
    "betas", whose first entry it sets (Adam and its kin), or "momentum" (SGD, RMSprop); None if neither. torch's
    schedulers look for them in this order."""
    return next((key for key in ("betas", "momentum") if key in optimizer.defaults), None)


def momentum_of(group, key):
    """A parameter group's momentum under cycled_setting's `key` (beta1 for "betas") as a float."""
    value = group[key]
    return float(value[0] if key == "betas" else value)


def set_step_settings(optimizer, lrs, momenta=None):
    """Set each parameter group's learning rate to lrs[i] and, where a recorded run cycled it (momenta not None), its
    momentum (Adam's beta1) to momenta[i]: one recorded step's settings, as the run's scheduler had set them."""
    key = cycled_setting(optimizer) if momenta is not None else None
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lrs[i]
        if key == "betas":
            group["betas"] = (momenta[i], *group["betas"][1:])
        elif key == "momentum":
            group["momentum"] = momenta[i]
