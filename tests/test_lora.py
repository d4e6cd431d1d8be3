"""LoRA adapters as low-rank task vectors: against peft's own forward and a naive dense reference."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

from adamerge.core.granularity import ChunkWise, GroupWise, TaskWise, TensorWise
from adamerge.core.merged_model import MergedModel
from adamerge.core.task_vectors import FactoredDelta, TaskVectors
from adamerge.errors import AdamergeError, CheckpointError, IncompatibleExpertError
from adamerge.methods.importance import layer_importance
from adamerge.objectives import losses
from adamerge.rewrite.operations import ties
from adamerge.run.module import MergingModule
from adamerge.sources.peft import expert_state_dict, load_lora_experts

HEAD = ["classifier.weight", "classifier.bias"]

# three adapters with different ranks, targets, scalings (rank/alpha patterns, rsLoRA, embeddings)
ADAPTERS = {
    "qv": dict(
        r=4, lora_alpha=8, target_modules=["query", "value"],
        rank_pattern={"layer.1.attention.self.query": 2}, alpha_pattern={"value": 3},
    ),
    "qk_emb": dict(r=2, lora_alpha=5, target_modules=["query", "key", "word_embeddings"], use_rslora=True),
    "dense": dict(r=3, lora_alpha=6, target_modules=["dense"]),
}


def tiny_bert(seed: int = 0, hidden: int = 32, layers: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=40, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=16, num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


def make_adapter(base: nn.Module, directory: Path, seed: int, config) -> PeftModel:
    """A peft adapter over a copy of ``base`` with random non-zero factors and head, saved to ``directory``."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(0.3 * torch.randn_like(param))
    peft_model.save_pretrained(directory)
    return peft_model.eval()


@pytest.fixture(scope="module")
def bert_setup(tmp_path_factory):
    base = tiny_bert()
    root = tmp_path_factory.mktemp("lora")
    peft_models, dirs = {}, {}
    for seed, (task, options) in enumerate(ADAPTERS.items()):
        dirs[task] = root / task
        config = LoraConfig(task_type="SEQ_CLS", init_lora_weights=False, **options)
        peft_models[task] = make_adapter(base, dirs[task], seed + 1, config)
    return base, dirs, peft_models


def batch(seed: int = 0, vocab: int = 40) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (3, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 5:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def peft_deltas(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """peft's own dense ``ΔW`` of every adapted module, keyed by the base parameter name."""
    deltas = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "scaling", {}):
            deltas[f"{name}.weight"] = module.get_delta_weight("default").detach()
    return deltas


def merged_from(base: nn.Module, dirs: dict[str, Path], granularity=TensorWise(), **kwargs) -> MergedModel:
    task_vectors, heads = load_lora_experts(base, dirs, **kwargs)
    return MergedModel(copy.deepcopy(base), task_vectors, granularity, "none", 0.3, heads=heads, batchnorm="base")


# -- the store -------------------------------------------------------------------------------
def test_store_holds_factors_equal_to_peft_deltas(bert_setup):
    base, dirs, peft_models = bert_setup
    task_vectors, heads = load_lora_experts(base, dirs)
    expected_names = set().union(*(peft_deltas(m) for m in peft_models.values()))
    assert set(task_vectors.names) == expected_names  # only targeted tensors are merged
    for k, (task, peft_model) in enumerate(peft_models.items()):
        deltas = peft_deltas(peft_model)
        for name in task_vectors.names:
            part = dict(task_vectors.parts())[name]
            assert isinstance(part, FactoredDelta) and part.num_dense == 0
            assert (k in part.low_rank_tasks) == (name in deltas)  # merged from the adapters that target it
            reference = deltas.get(name, torch.zeros_like(base.state_dict()[name]))
            torch.testing.assert_close(task_vectors.task_delta(name, task), reference, rtol=1e-5, atol=1e-6)
        head = peft_model.base_model.model.classifier.modules_to_save["default"]
        torch.testing.assert_close(heads[task]["classifier.weight"], head.weight.detach())
    # ranks differ per adapter and per module (rank_pattern): concatenated, not padded
    query1 = dict(task_vectors.parts())["bert.encoder.layer.1.attention.self.query.weight"]
    assert query1.rank == 2 + 2 and query1.low_rank_tasks == (0, 1)


def test_dense_consumers_get_densified_vectors(bert_setup):
    base, dirs, peft_models = bert_setup
    task_vectors, _ = load_lora_experts(base, dirs)
    dense = dict(task_vectors.items())
    for k, peft_model in enumerate(peft_models.values()):
        for name, delta in peft_deltas(peft_model).items():
            torch.testing.assert_close(dense[name][k], delta, rtol=1e-5, atol=1e-6)
    reference = TaskVectors(task_vectors.tasks, dense)
    lam = torch.rand(3, len(task_vectors))
    assert layer_importance(lam, task_vectors.items()) == pytest.approx(layer_importance(lam, reference.items()))
    trimmed = ties(dict(task_vectors.items()), density=0.2)  # dense-only preprocessor: works on the densified store
    assert set(trimmed) == set(task_vectors.names)


def test_store_memory_is_low_rank():
    torch.manual_seed(0)
    ranks = [4, 8, 2, 16]
    tvs = {}
    for k, r in enumerate(ranks):
        a, b = torch.randn(r, 256), torch.randn(512, r)
        tvs[k] = (b, a)
    from adamerge.core.task_vectors import LowRankFactor

    delta = FactoredDelta((512, 256), len(ranks), factors=[LowRankFactor(k, b, a, 0.5) for k, (b, a) in tvs.items()])
    store = TaskVectors([f"t{k}" for k in range(len(ranks))], {"0.weight": delta})
    factor_bytes = 4 * sum(r * (512 + 256) for r in ranks)  # O(Σ r_k (in + out))
    index_bytes = 12 * sum(ranks)  # rank owner (int64) + scale (fp32) per rank column
    assert store.nbytes() == factor_bytes + index_bytes
    assert store.dense_nbytes() == 4 * len(ranks) * 512 * 256  # O(K in out), never allocated
    assert store.nbytes() < store.dense_nbytes() / 10


# -- forward and gradients -------------------------------------------------------------------
@pytest.mark.parametrize("task", list(ADAPTERS))
def test_one_hot_reproduces_peft_forward_and_merge_and_unload(bert_setup, task):
    base, dirs, peft_models = bert_setup
    merged = merged_from(base, dirs)
    k = merged.tasks.index(task)
    merged.coefficients.set_values(torch.nn.functional.one_hot(torch.tensor(k), 3).float())
    inputs = batch()
    peft_model = peft_models[task]
    with torch.no_grad():
        expected = peft_model(**inputs).logits
        torch.testing.assert_close(merged(inputs, task), expected, rtol=1e-4, atol=1e-5)
        unloaded = merged.merge_and_unload(task)
        torch.testing.assert_close(unloaded(**inputs).logits, expected, rtol=1e-4, atol=1e-5)
        peft_merged = copy.deepcopy(peft_model).merge_and_unload()
        state = merged.merged_state_dict(task)
        for name, tensor in peft_merged.state_dict().items():
            torch.testing.assert_close(state[name], tensor, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(peft_merged(**inputs).logits, expected, rtol=1e-4, atol=1e-5)
        alone = expert_state_dict(base, merged.task_vectors, {t: merged.heads.for_task(t) for t in merged.tasks}, task)
        for name, tensor in peft_merged.state_dict().items():
            torch.testing.assert_close(alone[name], tensor, rtol=1e-5, atol=1e-6)


def dense_reference(base, peft_models, merged: MergedModel, lam: torch.Tensor, inputs, task: str):
    """Naive reference: θ = θ_0 + Σ_k λ_k ΔW_k from peft's dense deltas, gradients by autograd."""
    lam = lam.detach().clone().requires_grad_()
    layout = merged.layout
    tensors = dict(base.named_parameters())
    for name in layout.tensor_names:
        group = layout.group_of(name)
        deltas = [peft_deltas(m).get(name) for m in peft_models.values()]
        tensors[name] = tensors[name] + sum(lam[k, group] * d for k, d in enumerate(deltas) if d is not None)
    tensors.update(merged.heads.for_task(task))
    logits = functional_call(base, tensors, (), inputs).logits
    logits.square().sum().backward()
    return logits.detach(), lam.grad


@pytest.mark.parametrize(
    "granularity", [TaskWise(), TensorWise(), GroupWise([r"layer\.(\d+)\."])], ids=["task", "layer", "group"]
)
def test_forward_and_coefficient_gradients_match_dense_reference(bert_setup, granularity):
    base, dirs, peft_models = bert_setup
    merged = merged_from(base, dirs, granularity)
    torch.manual_seed(1)
    lam = torch.rand(3, merged.layout.num_groups)
    merged.coefficients.set_values(lam)
    inputs = batch(1)
    for task in merged.tasks:
        merged.coefficients.raw.grad = None
        logits = merged(inputs, task)
        logits.square().sum().backward()
        ref_logits, ref_grad = dense_reference(base, peft_models, merged, lam, inputs, task)
        torch.testing.assert_close(logits.detach(), ref_logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(merged.coefficients.raw.grad, ref_grad, rtol=1e-4, atol=1e-5)


def dense_twin(merged: MergedModel, base, granularity) -> MergedModel:
    """The same merge with every task vector densified (the existing dense path as the reference)."""
    dense = TaskVectors(merged.tasks, dict(merged.task_vectors.items()))
    heads = {t: merged.heads.for_task(t) for t in merged.heads.tasks}
    return MergedModel(copy.deepcopy(base), dense, granularity, "none", 0.3, heads=heads, batchnorm="base")


def test_use_time_merge_equals_the_up_front_merge_and_restores_the_base(bert_setup):
    base, dirs, _ = bert_setup
    merged = merged_from(base, dirs, GroupWise([r"layer\.(\d+)\."]))
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert name in merged._use_time
    weight = merged.model.get_parameter(name)
    inputs = batch(6)
    logits = merged(inputs, "dense")  # factored tensors merged in forward pre-hooks
    logits.square().sum().backward()
    use_time_grad = merged.coefficients.raw.grad.clone()
    assert merged.model.get_parameter(name) is weight and not weight.requires_grad  # base restored
    merged.coefficients.raw.grad = None
    up_front = merged(inputs, "dense", merged=merged.merged_tensors())
    up_front.square().sum().backward()
    torch.testing.assert_close(logits, up_front)
    torch.testing.assert_close(use_time_grad, merged.coefficients.raw.grad)


def test_contiguous_chunks_match_the_dense_path(bert_setup):
    base, dirs, _ = bert_setup
    granularity = ChunkWise({"bert.encoder.layer.0.attention.self.query.weight": 5, "bert.embeddings.word_embeddings.weight": 3})
    merged = merged_from(base, dirs, granularity)
    reference = dense_twin(merged, base, granularity)
    torch.manual_seed(2)
    lam = torch.rand(3, merged.layout.num_groups)
    merged.coefficients.set_values(lam)
    reference.coefficients.set_values(lam)
    inputs = batch(2)
    for model in (merged, reference):
        model(inputs, "qv").square().sum().backward()
    torch.testing.assert_close(merged(inputs, "qv"), reference(inputs, "qv"), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged.coefficients.raw.grad, reference.coefficients.raw.grad, rtol=1e-4, atol=1e-5)


def test_low_precision_factors_stay_close(bert_setup):
    base, dirs, _ = bert_setup
    full = merged_from(base, dirs)
    half = merged_from(base, dirs, dtype=torch.bfloat16)
    assert half.task_vectors.dtype == torch.bfloat16 and half.task_vectors.nbytes() < 0.6 * full.task_vectors.nbytes()
    inputs = batch(5)
    with torch.no_grad():
        torch.testing.assert_close(half(inputs, "qv"), full(inputs, "qv"), rtol=2e-2, atol=2e-2)


def test_random_partitions_on_factored_tensors_are_refused(bert_setup):
    base, dirs, _ = bert_setup
    with pytest.raises(AdamergeError, match=r"word_embeddings\.weight.*LoRA factors.*partition"):
        merged_from(base, dirs, ChunkWise(2, "random"))


@pytest.mark.parametrize("low_rank_step", ["at-use", "per-step", "auto"])
def test_training_step_hands_the_merge_gradient_to_lambda(bert_setup, low_rank_step):
    base, dirs, _ = bert_setup
    merged = merged_from(base, dirs)
    module = MergingModule(merged, low_rank_step=low_rank_step)
    assert module.merges_at_use == (low_rank_step == "at-use")  # auto: a tiny model's adapters merge once per step
    inputs = {task: batch(3 + k) for k, task in enumerate(merged.tasks)}
    module.training_step(inputs, 0).backward()
    step_grad = merged.coefficients.raw.grad.clone()
    merged.coefficients.raw.grad = None
    sum(losses.entropy(merged(x, task)) for task, x in inputs.items()).backward()
    torch.testing.assert_close(step_grad, merged.coefficients.raw.grad, rtol=1e-4, atol=1e-6)


def test_auto_merges_once_per_step_while_the_merged_adapted_weights_are_small(bert_setup):
    base, dirs, _ = bert_setup
    merged = merged_from(base, {"qv": dirs["qv"]})  # query and value of each layer
    weights = dict(merged.model.named_parameters())
    adapted = [name for name in merged.task_vectors.names if name.endswith(("query.weight", "value.weight"))]
    nbytes = sum(weights[name].numel() * 4 for name in adapted)  # float32
    assert merged.use_time_nbytes() == nbytes
    assert not MergingModule(merged).merges_at_use  # a few KiB, far below PER_STEP_MERGE_LIMIT
    with patch("adamerge.run.module.PER_STEP_MERGE_LIMIT", 2 * nbytes):  # merged weights + their gradients
        assert not MergingModule(merged).merges_at_use
    with patch("adamerge.run.module.PER_STEP_MERGE_LIMIT", 2 * nbytes - 1):
        assert MergingModule(merged).merges_at_use
    with pytest.raises(AdamergeError, match="low_rank_step='sometimes': expected one of auto, per-step, at-use"):
        MergingModule(merged, low_rank_step="sometimes")


# -- mixed dense + LoRA ----------------------------------------------------------------------
def fine_tuned_state(base: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A dense expert: every encoder tensor perturbed, embeddings untouched, its own head."""
    generator = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for name, tensor in state.items():
        if tensor.is_floating_point() and (".encoder." in name or name.startswith("classifier.")):
            state[name] = tensor + 0.05 * torch.randn(tensor.shape, generator=generator)
    return state


def test_mixed_dense_and_lora_experts(bert_setup):
    base, dirs, peft_models = bert_setup
    dense_state = fine_tuned_state(base, 7)
    task_vectors, heads = load_lora_experts(
        base, {"qv": dirs["qv"], "qk_emb": dirs["qk_emb"]}, {"full": lambda: dense_state},
        tasks=["qv", "full", "qk_emb"],
    )
    assert task_vectors.tasks == ("qv", "full", "qk_emb")
    parts = dict(task_vectors.parts())
    base_state = base.state_dict()
    # dense rows only for the dense expert, LoRA factors only for the adapters that target the tensor
    query = parts["bert.encoder.layer.0.attention.self.query.weight"]
    assert query.dense_index.tolist() == [1] and query.low_rank_tasks == (0, 2) and query.dense.shape[0] == 1
    intermediate = parts["bert.encoder.layer.0.intermediate.dense.weight"]
    assert intermediate.dense.shape[0] == 1 and intermediate.rank == 0
    assert "bert.embeddings.word_embeddings.weight" in parts  # targeted by qk_emb only
    assert parts["bert.embeddings.word_embeddings.weight"].num_dense == 0  # the dense expert leaves it
    assert "bert.embeddings.position_embeddings.weight" not in parts  # no adapter, no dense change
    assert "classifier.weight" not in parts
    torch.testing.assert_close(heads["full"]["classifier.weight"], dense_state["classifier.weight"])
    for name in task_vectors.names:
        torch.testing.assert_close(task_vectors.task_delta(name, "full"), dense_state[name] - base_state[name])
        lora = peft_deltas(peft_models["qk_emb"]).get(name, torch.zeros_like(base_state[name]))
        torch.testing.assert_close(task_vectors.task_delta(name, "qk_emb"), lora, rtol=1e-5, atol=1e-6)

    merged = MergedModel(copy.deepcopy(base), task_vectors, TensorWise(), "none", heads=heads, batchnorm="base")
    reference = dense_twin(merged, base, TensorWise())
    torch.manual_seed(3)
    lam = torch.rand(3, merged.layout.num_groups)
    inputs = batch(4)
    for model in (merged, reference):
        model.coefficients.set_values(lam)
        model(inputs, "full").square().sum().backward()
    torch.testing.assert_close(merged(inputs, "full"), reference(inputs, "full"), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged.coefficients.raw.grad, reference.coefficients.raw.grad, rtol=1e-4, atol=1e-5)
    # one-hot on the dense expert reproduces it
    merged.coefficients.set_values(torch.tensor([0.0, 1.0, 0.0]))
    plain = tiny_bert()
    plain.load_state_dict(dense_state)
    with torch.no_grad():
        torch.testing.assert_close(merged(inputs, "full"), plain(**inputs).logits, rtol=1e-4, atol=1e-5)
    # chunks over a mixed tensor
    chunked = ChunkWise({"bert.encoder.layer.0.attention.self.query.weight": 4})
    merged_c = MergedModel(copy.deepcopy(base), task_vectors, chunked, "none", heads=heads, batchnorm="base")
    reference_c = dense_twin(merged_c, base, chunked)
    lam = torch.rand(3, merged_c.layout.num_groups)
    for model in (merged_c, reference_c):
        model.coefficients.set_values(lam)
        model(inputs, "qv").square().sum().backward()
    torch.testing.assert_close(merged_c.coefficients.raw.grad, reference_c.coefficients.raw.grad, rtol=1e-4, atol=1e-5)


# -- GPT-2 Conv1D (fan_in_fan_out) -----------------------------------------------------------
def test_gpt2_conv1d_adapter_matches_peft(tmp_path):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=32, n_layer=2, n_head=2, num_labels=2, pad_token_id=0)
    base = GPT2ForSequenceClassification(config).eval()
    lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False)
    peft_model = make_adapter(base, tmp_path / "gpt2", 5, lora)
    task_vectors, heads = load_lora_experts(base, {"g": tmp_path / "gpt2"})
    assert "transformer.h.0.attn.c_attn.weight" in task_vectors.names and set(heads["g"]) == {"score.weight"}
    merged = MergedModel(copy.deepcopy(base), task_vectors, TaskWise(), "none", 1.0, heads=heads, batchnorm="base")
    inputs = {"input_ids": torch.randint(1, 40, (2, 6))}
    with torch.no_grad():
        torch.testing.assert_close(merged(inputs, "g"), peft_model(**inputs).logits, rtol=1e-4, atol=1e-5)


# -- refusals --------------------------------------------------------------------------------
def save_adapter(base, directory: Path, config) -> Path:
    make_adapter(base, directory, 0, config)
    return directory


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (lambda: IA3Config(target_modules=["query", "value"], feedforward_modules=[]), r"IA3 adapter"),
        (lambda: LoraConfig(r=2, target_modules=["query"], use_dora=True), r"DoRA"),
        (lambda: LoraConfig(r=2, target_modules=["query"], lora_bias=True), r"bias on lora_B"),
        (lambda: LoraConfig(r=2, target_modules=["query"], bias="all"), r"trains base biases"),
    ],
    ids=["ia3", "dora", "lora_bias", "bias_all"],
)
@pytest.mark.filterwarnings("ignore:.*invalid shape")  # peft's own note on saving lora_B biases
def test_unsupported_adapters_are_refused(tmp_path, config, message):
    base = tiny_bert()
    directory = save_adapter(base, tmp_path / "adapter", config())
    with pytest.raises(IncompatibleExpertError, match=message) as info:
        load_lora_experts(base, {"a": directory})
    assert str(directory) in str(info.value)


def test_adapter_of_another_base_is_refused(tmp_path):
    wider = save_adapter(tiny_bert(hidden=48), tmp_path / "wider", LoraConfig(r=2, target_modules=["query"]))
    deeper = save_adapter(tiny_bert(layers=3), tmp_path / "deeper", LoraConfig(r=2, target_modules=["query"]))
    base = tiny_bert()
    with pytest.raises(IncompatibleExpertError, match=r"layer\.0\.attention\.self\.query.*\(48, 48\).*\(32, 32\).*another base") as info:
        load_lora_experts(base, {"w": wider})
    assert str(wider) in str(info.value)
    with pytest.raises(IncompatibleExpertError, match=r"targets module 'bert\.encoder\.layer\.2\..*does not have") as info:
        load_lora_experts(base, {"d": deeper})
    assert str(deeper) in str(info.value)


def test_missing_directory_non_finite_factors_and_base_name_warning(tmp_path, caplog):
    base = tiny_bert()
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        load_lora_experts(base, {"x": tmp_path / "nothing"})
    broken = save_adapter(base, tmp_path / "nan", LoraConfig(r=2, target_modules=["query"]))
    weights = load_file(broken / "adapter_model.safetensors")
    next(v for k, v in weights.items() if "lora_A" in k)[0, 0] = float("nan")
    save_file(weights, broken / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"nan.*lora_A.*NaN"):
        load_lora_experts(base, {"n": broken})
    other = tiny_bert()
    other.name_or_path = "org/other-bert"  # peft records the model's name_or_path
    directory = save_adapter(other, tmp_path / "named", LoraConfig(r=2, target_modules=["query"]))
    with caplog.at_level(logging.WARNING, logger="adamerge.sources.peft"):
        load_lora_experts(base, {"a": directory}, base_name="org/my-bert")
    assert "org/other-bert" in caplog.text and "org/my-bert" in caplog.text


def test_lora_on_a_head_tensor_is_refused(tmp_path):
    base = tiny_bert()
    directory = save_adapter(base, tmp_path / "head", LoraConfig(r=2, target_modules=["query", "classifier"]))
    with pytest.raises(IncompatibleExpertError, match=r"classifier\.weight.*task-specific"):
        load_lora_experts(base, {"a": directory}, head_names=HEAD)
