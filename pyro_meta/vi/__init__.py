"""Classical variational inference, checked against closed forms and MCMC."""

from .mixture import (
    MixtureFit,
    MixtureGuide,
    cavi,
    closed_form_elbo,
    initial_q,
    mixture_model,
    plot_comparison,
    run_nuts,
    run_svi,
    simulate_mixture,
    sort_components,
    to_inference_data,
)

__all__ = ["MixtureFit", "MixtureGuide", "cavi", "closed_form_elbo", "initial_q", "mixture_model",
           "plot_comparison", "run_nuts", "run_svi", "simulate_mixture", "sort_components",
           "to_inference_data"]
