"""Experiment tracking: each run's metrics lines, config, summary and adapter, also
sent to the tools practitioners already use (MLflow, TensorBoard).

``setup.open_tracker`` builds what ``tracking.*`` asks for; the run's output writer
(:class:`common.outputs.RunOutputs`) feeds it whatever it writes. ``base`` holds the
protocol, ``mlflow_run`` and ``tensorboard_events`` the two tools, ``packages`` the
check that their optional packages are installed.
"""
