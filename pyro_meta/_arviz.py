"""ArviZ, imported once for the whole library without its refactor notice.

ArviZ 0.2x prints a four-line ``FutureWarning`` ("ArviZ is undergoing a major refactor ...") on import,
which every ``pyro-meta`` command would otherwise start with. Only that notice is filtered, and only
around the import; every other warning, ArviZ's included, stays visible. Modules of this library import
``az`` from here.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing a major refactor", category=FutureWarning)
    import arviz as az

__all__ = ["az"]
