"""nmoe-eval: CORE (the DCLM 22-task suite), choice and generation tasks, and a sandbox for code.

Built on nmoe-core only (never nmoe-train): checkpoints are read with safetensors + JSON
(`nmoe_eval.checkpoint`). ``n eval`` is the command line (`nmoe_eval.cli`); training calls
`nmoe_eval.runner.run_in_training`.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "run_in_training"]


def __getattr__(name: str):
    if name == "run_in_training":  # lazy: keeps `import nmoe_eval` (and `n --help`) free of torch
        from nmoe_eval.runner import run_in_training

        return run_in_training
    raise AttributeError(f"module 'nmoe_eval' has no attribute {name!r}")
