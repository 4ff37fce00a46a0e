"""finetune's Hydra plugin: the joblib launcher that survives a job's hard death (launcher.py).
It lives in `hydra_plugins` because Hydra instantiates launchers only from there."""
