"""nmoe-train's data layer: token shards with index and manifest, `prepare` / ``n data``, the
built-in corpora and the deterministic resumable `TokenLoader` with mixtures.

Modules: `shards` (on-disk format, `verify`), `sources` (document sources), `prep` (`prepare`,
``n data`` CLI), `corpus` (``builtin:shakespeare``, `ensure_builtin_dataset`), `loader`
(`TokenLoader`). See the package README's "Data" section.
"""

from nmoe_train.data.corpus import BUILTIN_CORPORA, ensure_builtin_dataset
from nmoe_train.data.loader import TokenLoader
from nmoe_train.data.prep import data_main, data_prep_main, prepare
from nmoe_train.data.shards import DataError, open_split, read_index, read_manifest, verify

__all__ = [
    "BUILTIN_CORPORA",
    "DataError",
    "TokenLoader",
    "data_main",
    "data_prep_main",
    "ensure_builtin_dataset",
    "open_split",
    "prepare",
    "read_index",
    "read_manifest",
    "verify",
]
