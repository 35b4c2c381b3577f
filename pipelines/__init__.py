"""The KFP side, as the TFX template lays it out: ``daily_retrain.py`` builds the one pipeline from
parameters; ``local_runner.py`` (kfp.local) and ``kubeflow_runner.py`` (compile, schedule) only choose
where it runs; ``cli.py`` adds ``apem pipeline`` to the ``apem`` command. Installed as ``apem_kfp.pipelines``.
"""
