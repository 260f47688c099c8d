"""Optional packages: whether one is installed, and the one line saying how to get it.

``spunge validate`` and every command check them before any work (a config that needs Optuna, lm-eval or
peft without it fails at once, naming the pip command), instead of failing inside a Ray task later.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Optional

INSTALL = {  # import name -> how to install it
    "optuna": "pip install 'spunge[tune]'",
    "lm_eval": "pip install 'spunge[lmeval]'",
    "peft": "pip install peft",
    "flash_attn": "pip install flash-attn (and a GPU)",
    "flash_attn_interface": "pip install flash-attn-3 (and a GPU)",
}


def installed(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None  # None: blocked, as tests do to simulate its absence
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing(module: str, needed_by: str) -> Optional[str]:
    """None when ``module`` is installed; else ``"<needed_by> needs the <module> package: <pip command>"``."""
    if installed(module):
        return None
    return f"{needed_by} needs the {module} package: {INSTALL.get(module, f'pip install {module}')}"
