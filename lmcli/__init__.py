"""lm: deploy large language models on the machine you have and serve them the way users already know."""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "pipeline":  # imported on use: `import lmcli` stays light
        from lmcli.engine.pipeline import pipeline

        return pipeline
    raise AttributeError(f"module 'lmcli' has no attribute {name!r}")
