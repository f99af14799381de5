"""Lazy imports of optional packages with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from xmodal.errors import MissingPackageError

_EXTRAS = {
    "torchvision": "vision",
    "timm": "vision",
    "tensorboard": "tensorboard",
    "torch.utils.tensorboard": "tensorboard",
}


def require(module: str, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise :class:`~xmodal.errors.MissingPackageError` (an ImportError)
    telling the user what to install."""
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken compiled extension
        extra = _EXTRAS.get(module)
        hint = f"pip install 'xmodal[{extra}]'" if extra else f"pip install {module.split('.')[0]}"
        what = f" (needed for {purpose})" if purpose else ""
        raise MissingPackageError(f"optional package '{module}' is not usable{what}: {exc}", package=module,
                                  hint=f"install it with: {hint}") from exc
