"""Every shipped accelerate config loads with accelerate's own loaders and says what it must."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_multi_gpu_env
from conftest import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))
# decoder-layer class per family, as the fsdp.yaml comment lists them
LAYER_CLASSES = {
    "llama": "LlamaDecoderLayer",
    "qwen2": "Qwen2DecoderLayer",
    "qwen3": "Qwen3DecoderLayer",
    "mistral": "MistralDecoderLayer",
}


def _launch_args(path: Path):
    """The arguments ``accelerate launch --config_file path`` would run with (config file applied)."""
    args = launch_command_parser().parse_args(["--config_file", str(path), "scripts/prune_heal.py"])
    return _validate_launch_command(args)[0]


def test_the_expected_configs_ship():
    assert [p.name for p in SHIPPED] == ["ddp-multinode.yaml", "ddp.yaml", "fsdp.yaml"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_loads_with_accelerates_config_class(path):
    config = load_config_from_file(str(path))  # raises on unknown top-level keys
    assert isinstance(config, ClusterConfig)
    assert config.num_processes >= 1 and config.num_processes % config.num_machines == 0
    assert config.mixed_precision == "bf16" and not config.use_cpu
    assert 0 <= config.machine_rank < config.num_machines


def test_ddp_single_node():
    config = load_config_from_file(str(CONFIGS / "ddp.yaml"))
    assert config.distributed_type == DistributedType.MULTI_GPU and config.num_machines == 1
    args = _launch_args(CONFIGS / "ddp.yaml")
    assert args.multi_gpu and not args.use_fsdp and args.num_processes == 8


def test_ddp_multinode_has_the_fields_to_fill():
    config = load_config_from_file(str(CONFIGS / "ddp-multinode.yaml"))
    assert config.distributed_type == DistributedType.MULTI_GPU
    assert config.num_machines == 2 and config.num_processes == 16  # total over machines
    assert config.main_process_ip and isinstance(config.main_process_port, int)
    text = (CONFIGS / "ddp-multinode.yaml").read_text()
    for field in ("num_machines", "num_processes", "machine_rank", "main_process_ip", "main_process_port"):
        assert f"#   {field}" in text, f"{field} is not explained"
    args = _launch_args(CONFIGS / "ddp-multinode.yaml")
    assert args.multi_gpu and args.num_machines == 2


def test_fsdp2_plugin_built_from_the_launch_environment():
    """The environment accelerate launch exports, read back by the FSDP plugin the Trainer builds."""
    config = load_config_from_file(str(CONFIGS / "fsdp.yaml"))
    assert config.distributed_type == DistributedType.FSDP
    args = _launch_args(CONFIGS / "fsdp.yaml")
    assert args.use_fsdp and args.fsdp_version == 2
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # full shard
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"  # each rank saves its shard
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert not plugin.activation_checkpointing
    model = make_tiny_model("llama")
    plugin.set_auto_wrap_policy(model)  # raises if the class name is not in the model
    wrapped = [m for m in model.modules() if plugin.auto_wrap_policy(m, recurse=False, nonwrapped_numel=0)]
    assert len(wrapped) == model.config.num_hidden_layers
    assert {type(m).__name__ for m in wrapped} == {"LlamaDecoderLayer"}


@pytest.mark.parametrize("family", sorted(LAYER_CLASSES))
def test_documented_layer_class_names_exist(family):
    text = (CONFIGS / "fsdp.yaml").read_text()
    assert LAYER_CLASSES[family] in text
    names = {type(m).__name__ for m in make_tiny_model(family).modules()}
    assert LAYER_CLASSES[family] in names
