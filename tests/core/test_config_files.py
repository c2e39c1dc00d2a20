"""Config files that cannot be read: a ``ConfigError`` naming the file (and line), quickly, whatever they hold.

The plugin config (a path, or ``VLM_DPO_CONFIG`` for the LLaMA-Factory and ms-swift adapters) and
``vlm-dpo doctor --config``'s training configs; a value the doctor cannot use is a finding on its key.
"""

from __future__ import annotations

import json
import time

import pytest

from vlm_dpo_plugins.cli import main
from vlm_dpo_plugins.config import CONFIG_PATH_VARIABLE
from vlm_dpo_plugins.config_files import MAX_BYTES
from vlm_dpo_plugins.config_source import load_plugin_config
from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.manager import create_plugin_manager

BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]\n" for previous, name in zip("abcdefgh", "bcdefghi")
)


def load(path):
    return create_plugin_manager(load_entry_points=False).load_config(path)


def config_error(path) -> str:
    with pytest.raises(ConfigError) as error:
        load(path)
    return str(error.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "loss:\n  type: hinge\n beta: 0.2\n",
            "', line 3, column 2: not valid YAML: while parsing a block mapping expected <block end>, but found "
            "'<block mapping start>'. Fix: correct the YAML there",
        ),
        (
            "loss: !!python/object/apply:os.system ['echo hacked']\n",
            "', line 1, column 7: could not determine a constructor for the tag "
            "'tag:yaml.org,2002:python/object/apply:os.system'; config files are read as plain YAML (no !!python "
            "tags). Fix: write the value as plain text, numbers, lists and mappings",
        ),
        ("loss: [unclosed\n", "', line 2, column 1: not valid YAML: while parsing a flow sequence expected ','"),
        ("guards:\n  max_consecutive_skips: " + "7" * 5000 + "\n", "': cannot be read as YAML (ValueError: Exceeds"),
        ("a: &a [*a]\n", "': an alias refers to a value that contains it (a recursive alias). Fix: write the values"),
    ],
)
def test_an_unreadable_yaml_file_names_file_and_line(tmp_path, text, expected):
    path = tmp_path / "plugins.yaml"
    path.write_text(text)
    message = config_error(path)
    assert message.startswith(f"plugin config file '{path}{expected}"), message


def test_non_utf8_bytes_name_the_byte_and_line(tmp_path):
    path = tmp_path / "plugins.yaml"
    path.write_bytes(b"loss:\n  type: hinge # \xe9t\xe9\n")
    assert config_error(path) == (
        f"plugin config file '{path}' is not UTF-8 text: invalid continuation byte at byte 22 (line 2). Fix: save it "
        "as UTF-8"
    )


def test_a_billion_laughs_is_refused_in_moments(tmp_path):
    path = tmp_path / "plugins.yaml"
    path.write_text(BILLION_LAUGHS + "loss: *i\n")
    assert len(BILLION_LAUGHS) < 600
    started = time.monotonic()
    message = config_error(path)
    assert time.monotonic() - started < 2
    assert message == (
        f"plugin config file '{path}': its aliases expand to more than 1,000,000 values. Fix: write the values "
        "out, or use fewer aliases"
    )


def test_a_value_of_many_aliases_below_the_cap_is_quoted_bounded(tmp_path):
    path = tmp_path / "plugins.yaml"
    # The anchors a..e (9^5 ~ 59k values once expanded) as the items of one value.
    items = [f"    - {line.split(': ', 1)[1]}" for line in BILLION_LAUGHS.splitlines() if line[0] in "abcde"]
    path.write_text("guards:\n  max_grad_norm:\n" + "\n".join(items) + "\n")
    started = time.monotonic()
    message = config_error(path)
    assert time.monotonic() - started < 5
    assert message.startswith("'guards.max_grad_norm' must be float, got [['lol', 'lol', 'lol', 'lol', 'lol', 'lol',")
    assert len(message) < 200


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "plugins.yaml"
    with open(path, "wb") as file:
        file.truncate(50 * 2**20)  # sparse: 50 MiB on paper
    assert config_error(path) == (
        f"plugin config file '{path}' is 50 MiB; a config file is at most {MAX_BYTES // 2**20} MiB. Fix: check the "
        "path (is it a dataset or a checkpoint?)"
    )


def test_a_missing_file_named_by_the_environment_names_the_variable(tmp_path, monkeypatch):
    missing = str(tmp_path / "vlm_dpo.yaml")
    monkeypatch.setenv(CONFIG_PATH_VARIABLE, missing)
    with pytest.raises(ConfigError) as error:
        load_plugin_config(create_plugin_manager(load_entry_points=False), missing)  # as the adapters call it
    assert str(error.value) == (
        f"plugin config file '{missing}' (named by VLM_DPO_CONFIG) not found (looked for '{missing}'). Fix: give "
        "the path of an existing file"
    )


def test_a_folder_and_a_non_mapping_are_named(tmp_path):
    assert config_error(tmp_path) == (
        f"plugin config file '{tmp_path}' is a folder. Fix: give the path of the file in it"
    )
    path = tmp_path / "plugins.yaml"
    path.write_text("- loss\n")
    assert config_error(path).startswith(f"plugin config file '{path}': expected a mapping of sections at the top")


def test_keys_and_values_are_quoted_bounded(tmp_path):
    path = tmp_path / "plugins.yaml"
    path.write_text("loss:\n  1: 2\n")
    assert config_error(path) == "config key 1 under 'loss.' is not a name"
    path.write_text(f"loss:\n  type: {'x' * 100_000}\n")
    message = config_error(path)
    assert message.startswith("'loss.type' is 'xxxxxxxx") and len(message) < 300


# ---------------------------------------------------------------- vlm-dpo doctor --config


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("dpo.yaml", "stage: dpo\n  lora_rank: 8\n", "config file '{path}', line 2, column 12: not valid YAML: "),
        ("args.json", '{"rlhf_type": "dpo",}', "config file '{path}', line 1, column 21: not valid JSON: "),
        ("run.sh", 'swift rlhf --rlhf_type dpo --beta "0.1\n', "config file '{path}' cannot be read as a command line: "
         "No closing quotation. Fix: balance the quotes (or escape the quote)"),
        ("dpo.yaml", "stage: !!python/name:os.system dpo\n", "config file '{path}', line 1, column 8: could not "),
    ],
)
def test_doctor_names_an_unreadable_config(tmp_path, capsys, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    assert main(["doctor", "--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("vlm-dpo: error: " + expected.format(path=path)), error


def test_doctor_reports_each_unusable_value_on_its_key_and_still_lints_the_rest(tmp_path, capsys):
    (tmp_path / "ds.json").write_text('{"zero_optimization": ')
    path = tmp_path / "dpo.yaml"
    path.write_text(
        'stage: dpo\nlora_alpha: "abc"\nlora_rank: -3\nlora_target: 5\npref_loss: [1]\ndeepspeed: ds.json\n'
        "pref_beta: 0\n"
    )
    assert main(["doctor", "--config", str(path), "--json"]) == 1
    findings = {(f["code"], f["field"]): f for f in json.loads(capsys.readouterr().out)["config"]["findings"]}
    assert findings[("config-value", "lora_alpha")]["message"] == (
        "lora_alpha is 'abc'; expected a number: llamafactory refuses the config"
    )
    assert findings[("config-value", "lora_alpha")]["fix"] == "set lora_alpha to a number, or remove it for the default"
    assert findings[("config-value", "lora_rank")]["message"].startswith("lora_rank is -3; expected a whole number")
    assert findings[("config-value", "lora_target")]["message"].startswith("lora_target is 5; expected module names")
    assert findings[("config-value", "pref_loss")]["message"].startswith("pref_loss is [1]; expected text")
    assert findings[("deepspeed-config", "deepspeed")]["message"] == (
        f"DeepSpeed config '{tmp_path / 'ds.json'}', line 1, column 23: not valid JSON: Expecting value: DeepSpeed "
        "fails on it at start-up"
    )
    assert ("beta-zero", "pref_beta") in findings  # the other rules still ran


def test_doctor_reads_a_bad_checkpointing_argument_as_a_finding(tmp_path, capsys):
    path = tmp_path / "run.sh"
    path.write_text("swift rlhf --rlhf_type dpo --gradient_checkpointing_kwargs '{\"use_reentrant\":' --lora_alpha x\n")
    assert main(["doctor", "--config", str(path)]) == 1
    output = capsys.readouterr().out
    assert "[error] config-value (field 'gradient_checkpointing_kwargs'): gradient_checkpointing_kwargs is " in output
    assert "[error] config-value (field 'lora_alpha'): lora_alpha is 'x'; expected a number" in output
