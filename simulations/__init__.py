"""Local simulations, baselines and the ``fedgraft`` command line."""
