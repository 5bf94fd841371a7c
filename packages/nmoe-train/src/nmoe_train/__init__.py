"""nmoe-train: train MoE models from a laptop CPU to a GPU cluster with one command.

Data preparation into token shards, a deterministic resumable loader, the training loop (single
process or torchrun; ZeRO-2 data parallel, expert parallel through nmoe-comm), asynchronous
checkpoints with exact resume, metrics in SQLite, and the speedrun with its leaderboard.
"""

__version__ = "0.1.0"
