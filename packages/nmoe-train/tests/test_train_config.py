"""Training config: presets, overrides with suggestions, TOML variables, fingerprint."""

from __future__ import annotations

import pytest

from nmoe_core.config import ConfigKeyError
from nmoe_train.config import ConfigFileError, load_toml, preset_config, resolve_config


def test_preset_and_typed_overrides():
    cfg = resolve_config(
        "tiny", ["steps=12", "model.moe.n_routed_experts=16", "optim.lr_dense=1e-3"]
    )
    assert cfg.steps == 12 and cfg.model.moe.n_routed_experts == 16
    assert cfg.optim.lr_dense == 1e-3 and cfg.preset == "tiny"


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(ConfigKeyError, match="did you mean steps"):
        resolve_config("tiny", ["stepz=3"])
    with pytest.raises(ConfigKeyError, match="model.moe.n_routed_experts"):
        resolve_config("tiny", ["model.moe.n_routed_expert=3"])


def test_bad_value_names_the_key():
    with pytest.raises(ValueError, match=r"steps: Input should be a valid integer.*, got 'many'$"):
        resolve_config("tiny", ["steps=many"])
    with pytest.raises(ValueError, match="seq_len"):
        resolve_config("tiny", ["seq_len=100000"])
    with pytest.raises(ConfigFileError, match="key=value"):
        resolve_config("tiny", ["steps"])
    with pytest.raises(ConfigFileError, match="neither a preset"):
        resolve_config("tinyy", [])


def test_toml_with_nmoe_variables(tmp_path, monkeypatch):
    path = tmp_path / "run.toml"
    path.write_text(
        'preset = "tiny"\n'
        'steps = 7\n'
        'runs_root = "${NMOE_RUNS}/x"\n'
        '[data]\n'
        'data_root = "${NMOE_DATA_ROOT:-/tmp/default}"\n'
        '[model.moe]\n'
        'n_routed_experts = 4\n'
    )
    monkeypatch.setenv("NMOE_RUNS", "/scratch")
    monkeypatch.delenv("NMOE_DATA_ROOT", raising=False)
    cfg = load_toml(path)
    assert cfg.steps == 7 and cfg.runs_root == "/scratch/x"
    assert cfg.data.data_root == "/tmp/default" and cfg.model.moe.n_routed_experts == 4
    assert cfg.model.dim == preset_config("tiny").model.dim  # rest comes from the preset


@pytest.mark.parametrize("value,message", [
    ("${HOME}/x", "HOME.*not allowed"),
    ("${NMOE_UNSET_VARIABLE}", "NMOE_UNSET_VARIABLE.*not set"),
    ("${nmoe_lower}", "not allowed"),
])
def test_toml_variable_errors_name_the_variable(tmp_path, monkeypatch, value, message):
    monkeypatch.delenv("NMOE_UNSET_VARIABLE", raising=False)
    path = tmp_path / "bad.toml"
    path.write_text(f'preset = "tiny"\nruns_root = "{value}"\n')
    with pytest.raises(ConfigFileError, match=message):
        load_toml(path)


def test_toml_unknown_key_and_syntax(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('preset = "tiny"\n[optim]\nlr_dens = 1.0\n')
    with pytest.raises(ConfigFileError, match="optim.lr_dens"):
        load_toml(path)
    path.write_text("steps = = 3\n")
    with pytest.raises(ConfigFileError, match="invalid TOML"):
        load_toml(path)
    with pytest.raises(ConfigFileError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")


def test_fingerprint_covers_math_not_run_length():
    base = preset_config("tiny")
    same = resolve_config("tiny", ["steps=99999", "log_every=3", "checkpoint_every=7",
                                   "target_loss=1.0", "run_name=x", "val_every=5"])
    assert base.fingerprint() == same.fingerprint()
    for change in ["seed=1", "optim.lr_dense=1e-2", "model.dim=192", "global_batch=32",
                   "seq_len=128", 'data.sources=[{"path": "/elsewhere"}]',
                   "optim.adamw_state_dtype=bfloat16"]:
        assert resolve_config("tiny", [change]).fingerprint() != base.fingerprint(), change
    # Execution only (same arithmetic, or last-bit fusion differences): a run may resume with
    # them switched either way.
    for change in ["compile=true", "cache_expert_weights=true", "activation_checkpointing=true"]:
        assert resolve_config("tiny", [change]).fingerprint() == base.fingerprint(), change


def test_fields_added_later_keep_old_fingerprints_at_their_neutral_value():
    # optim.adamw_state_dtype came after runs had been checkpointed: at "float32" (what the code
    # did before it existed) the fingerprint is that of the config without the field, so those
    # runs still resume. (Checked once against the code before the field: the tiny, super and
    # moonlet presets hash as they did.)
    import hashlib
    import json

    for name in ("tiny", "super"):
        cfg = preset_config(name)
        math = {
            "model": cfg.model.model_dump(mode="json"),
            "optim": cfg.optim.model_dump(mode="json", exclude={"adamw_state_dtype"}),
            "data": cfg.data.model_dump(mode="json", exclude={"data_root"}),
            "seq_len": cfg.seq_len, "global_batch": cfg.global_batch, "seed": cfg.seed,
            "precision": cfg.precision, "expert_parallel": cfg.parallel.expert_parallel,
        }
        old = hashlib.sha256(json.dumps(math, sort_keys=True).encode()).hexdigest()[:16]
        assert cfg.fingerprint() == old, name


def test_toml_unknown_key_names_the_nearest_and_unreadable_files_name_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "tiny"\nstpes = 5\n[optimizer]\nlr = 1\n'
                    '[[data.sources]]\npth = "/x"\n[parallel]\nfoo = 1\n')
    with pytest.raises(ConfigFileError) as info:
        load_toml(path)
    message = str(info.value)
    assert "stpes: unknown key; did you mean steps" in message, message
    assert "optimizer: unknown key; did you mean optim" in message, message
    assert "data.sources.0.pth: unknown key; did you mean path" in message, message
    assert "parallel.foo: unknown key; valid keys here: expert_parallel, dispatcher" in message
    (tmp_path / "dir.toml").mkdir()
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00steps = 3\n")
    for bad in ("dir.toml", "binary.toml"):
        with pytest.raises(ConfigFileError, match=f"config file .*{bad} cannot be read"):
            resolve_config(str(tmp_path / bad), [])
    path.write_text('preset = "tiny"\nsteps = "many"\n')  # a TOML value names what was given
    with pytest.raises(ConfigFileError, match=r"run\.toml: steps: Input should be a valid "
                                              r"integer.*, got 'many'$"):
        load_toml(path)
    path.write_text('preset = "tinyy"\n')
    with pytest.raises(ConfigFileError, match=r"run\.toml: preset: unknown preset 'tinyy'"):
        load_toml(path)


def test_data_sources_override_syntax_errors_show_the_quoting():
    # What the shell leaves of data.sources=[{"path": "/d"}] without single quotes around it.
    for value in ('[{path: /d}]', '/data/fineweb', '{"path": "/d"}'):
        with pytest.raises(ConfigFileError) as info:
            resolve_config("tiny", [f"data.sources={value}"])
        message = str(info.value)
        assert message.startswith(f"data.sources={value!r}"), message
        assert """data.sources='[{"path": "/data/fineweb", "weight": 3}""" in message, message
    with pytest.raises(ConfigFileError, match="model.moe.n_routed_experts=.*not valid JSON"):
        resolve_config("tiny", ["model.moe.n_routed_experts=[1,"])
    with pytest.raises(ValueError, match="data.sources: List should have at least 1 item"):
        resolve_config("tiny", ["data.sources=[]"])
    cfg = resolve_config("tiny", ['data.sources=[{"path": "/d", "weight": 2}]'])
    assert [(s.path, s.weight) for s in cfg.data.sources] == [("/d", 2.0)]


def test_fingerprint_changes_name_each_changed_field():
    base = preset_config("tiny")
    changed = resolve_config("tiny", ["optim.lr_dense=1e-2", "seed=7", "steps=5",
                                      'data.sources=[{"path": "/d"}]', "data.data_root=/x"])
    assert changed.fingerprint_changes(base.model_dump(mode="json")) == [
        'data.sources: [{"path": "builtin:shakespeare", "weight": 1.0}] -> '
        '[{"path": "/d", "weight": 1.0}]',
        f"optim.lr_dense: {base.optim.lr_dense} -> 0.01",
        "seed: 0 -> 7",
    ]
    assert base.fingerprint_changes(base.model_dump(mode="json")) == []
