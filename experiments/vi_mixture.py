"""The Bayesian mixture of Gaussians [Blei, Kucukelbir & McAuliffe 2017], fitted by CAVI, SVI (two
mean-field guides) and NUTS on one seeded, well-separated data set.

    python experiments/vi_mixture.py --n 500 --K 3 --sigma 5 --seed 0 --out runs/vi-mixture

Prints a table (per method: each component's posterior mean ± sd of mu, the ELBO, seconds) and writes
``<out>/results.md`` (the same table, the settings and notes) and ``<out>/vi_mixture.png`` (ELBO traces,
a forest plot of mu, the posterior over assignments). ``--quick`` shrinks everything for a smoke run.
The same as ``pyro-meta vi mixture``; the code is :mod:`pyro_meta.vi.experiment`. See :mod:`pyro_meta.vi.mixture` for the model, the closed-form ELBO and the label-switching handling.
"""

from __future__ import annotations

import sys

from pyro_meta.vi.experiment import main

if __name__ == "__main__":
    sys.exit(main())
