"""A VAE (or IWAE) on dynamically binarized 28x28 Omniglot, trained by pyro_meta's trainer, with the test
log-likelihood as the k = 5000 importance-weighted bound beside Burda et al.'s numbers.

    python experiments/vi_vae.py --objective elbo --k 1 --epochs 50 --out runs/vae-elbo-k1
    python experiments/vi_vae.py --objective iwae --k 50 --epochs 20 --out runs/vae-iwae-k50

The same as ``pyro-meta vi vae``; the code is :mod:`pyro_meta.vi.vae_experiment` (run directory, resume,
evaluation, report) and :mod:`pyro_meta.vi.vae` (model, guide, data stream, bounds, figure).
"""

from __future__ import annotations

import sys

from pyro_meta.vi.vae_experiment import main

if __name__ == "__main__":
    sys.exit(main())
