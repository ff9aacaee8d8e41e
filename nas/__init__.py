"""Search: data, proxy training, Optuna studies, Pareto analysis and export."""
