"""Causal language models: tiny Llama (tied head), Mistral (untied) and GPT-2 models built from
configs (random weights), their fine-tunes saved with save_pretrained, merged by adamerge and
reloaded by transformers alone.

The tests' tokenizer is word-level (:func:`causal_tokenizer`). Qwen2 is not among the families:
transformers 5 loads a Qwen2 folder's tokenizer as Qwen2's byte-level BPE whatever its
``tokenizer_class``, which turns a word-level vocabulary into a couple of tokens per text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig  # noqa: E402

from adamerge.cli import main  # noqa: E402
from adamerge.core.merged_model import MergedModel  # noqa: E402
from adamerge.errors import AdamergeError  # noqa: E402
from adamerge.run.module import MergingModule  # noqa: E402
from adamerge.sources import load_experts  # noqa: E402
from adamerge.task_types import TokenLevel  # noqa: E402

WORDS = "the a cat dog is good bad movie film great not very plot actor sport game news world team won yes no".split()
PROMPTS = {
    "sentiment": ["the movie is good", "a bad film", "great actor", "not a very good plot", "the film is bad"],
    "topic": ["the team won the game", "world news", "sport news is good", "the game is great", "a team"],
}
VOCAB = 5 + len(WORDS)  # the tokenizer's special tokens and words
CONFIGS = {
    "llama": lambda: LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                 tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=3),
    "mistral": lambda: MistralConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                 tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64,
                               pad_token_id=0, bos_token_id=2, eos_token_id=3),
}  # fmt: skip


@dataclass
class LMSetup:
    root: Path
    base: Path
    experts: dict[str, Path]
    calib: Path
    tokenizer: object

    def expert_args(self) -> list[str]:
        return [f"{task}=hf:{path}" for task, path in self.experts.items()]

    def load(self):
        return load_experts(f"hf:{self.base}", {t: f"hf:{p}" for t, p in self.experts.items()})

    def batch(self) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(["the movie is good", "a team won the game , yes"], padding=True, return_tensors="pt"))


def causal_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer as causal LMs have them: a begin token first, no end token added
    ([SEP] is the end-of-sequence token a model learns to emit), no token types."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", 2)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
        model_input_names=["input_ids", "attention_mask"],
    )


def build(root: Path, family: str) -> LMSetup:
    tokenizer = causal_tokenizer()
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    experts = {}
    for seed, task in enumerate(PROMPTS, start=1):
        torch.manual_seed(seed)
        expert = AutoModelForCausalLM.from_config(base.config).eval()
        expert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for param in expert.parameters():  # a tied LM head moves with its embedding
                param.add_(0.05 * torch.randn_like(param))
        experts[task] = root / task
        expert.save_pretrained(experts[task])
        (root / "calib" / task).mkdir(parents=True)
        (root / "calib" / task / "prompts.txt").write_text("\n".join(PROMPTS[task] * 4) + "\n")
    return LMSetup(root, root / "base", experts, root / "calib", tokenizer)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def lm(request, tmp_path_factory) -> LMSetup:
    return build(tmp_path_factory.mktemp(f"lm-{request.param}"), request.param)


def one_hot(k: int, n: int) -> torch.Tensor:
    values = torch.zeros(n)
    values[k] = 1.0
    return values


def test_one_hot_coefficients_give_each_expert(lm):
    experts = lm.load()
    assert experts.task_type == TokenLevel(next_token=True, keep_logits=True) and experts.heads == {} and experts.modality == "text"
    names = set(experts.task_vectors.names)
    tied = experts.model.config.tie_word_embeddings
    assert ("lm_head.weight" in names) != tied  # a tied head is the embedding: one task vector, not two
    batch = lm.batch()
    for k, task in enumerate(experts.tasks):
        merged = MergedModel(experts.model, experts.task_vectors, granularity="task", constraint="none", init=one_hot(k, 2))
        alone = AutoModelForCausalLM.from_pretrained(lm.experts[task]).eval()
        with torch.no_grad():
            torch.testing.assert_close(merged(batch), alone(**batch).logits, atol=1e-5, rtol=0)


def test_merged_state_of_a_tied_head_is_the_merged_embedding(lm):
    experts = lm.load()
    merged = MergedModel(experts.model, experts.task_vectors, granularity="layer", constraint="none", init=0.5)
    state = merged.merged_state_dict()
    head, embedding = experts.model.get_output_embeddings(), experts.model.get_input_embeddings()
    head_key = next(n for n, p in experts.model.named_parameters(remove_duplicate=False) if p is head.weight and "head" in n)
    embedding_key = next(n for n, p in experts.model.named_parameters() if p is embedding.weight)
    base = experts.model.state_dict()
    assert not torch.equal(state[embedding_key], base[embedding_key])
    if experts.model.config.tie_word_embeddings:
        torch.testing.assert_close(state[head_key], state[embedding_key], atol=0, rtol=0)


def test_padding_does_not_change_the_token_level_entropy(lm):
    experts = lm.load()
    merged = MergedModel(experts.model, experts.task_vectors, granularity="layer", init=0.3)
    module = MergingModule(merged, task_type=experts.task_type)
    texts = ["the movie is good", "a team won the game , yes"]
    padded = dict(lm.tokenizer(texts, padding=True, return_tensors="pt"))
    with torch.no_grad():
        positions, _ = module.task_type.scored(merged(padded), padded)
        alone = [experts.task_type.scored(merged(dict(lm.tokenizer([t], return_tensors="pt"))),
                                          dict(lm.tokenizer([t], return_tensors="pt")))[0] for t in texts]  # fmt: skip
    expected = torch.cat(alone)  # (N, V): every real next-token position of each text, unpadded
    assert positions.shape == expected.shape
    torch.testing.assert_close(positions, expected, atol=1e-5, rtol=0)


def padded_on(tokenizer, texts: list[str], side: str) -> dict[str, torch.Tensor]:
    """``texts`` as one batch padded on ``side`` (the tokenizer left padding on the right)."""
    tokenizer.padding_side = side
    try:
        padded = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    finally:
        tokenizer.padding_side = "right"
    if side == "left":  # GPT-2's absolute positions: count from each prompt's first real token
        padded["position_ids"] = (padded["attention_mask"].cumsum(1) - 1).clamp(min=0)
    return padded


@pytest.mark.parametrize("side", ["right", "left"])
def test_response_positions_score_the_distribution_after_each_prompt(lm, side):
    """``positions="response"``: one ``(C,)`` row per prompt, the next-token distribution after its
    last real token, whichever side the padding is on; labelled batches keep their labels."""
    experts = lm.load()
    merged = MergedModel(experts.model, experts.task_vectors, granularity="layer", init=0.3)
    response = TokenLevel(next_token=True, positions="response")
    texts = ["the movie is good", "a team won the game , yes", "world"]
    padded = padded_on(lm.tokenizer, texts, side)
    with torch.no_grad():
        rows, targets = response.scored(merged(padded), padded)
        alone = torch.stack([merged(dict(lm.tokenizer([t], return_tensors="pt")))[0, -1] for t in texts])  # (B, V)
        labels = padded["input_ids"].masked_fill(padded["attention_mask"] == 0, -100)
        labelled, _ = response.scored(merged(padded), padded, labels)
    assert targets is None and rows.shape == alone.shape
    torch.testing.assert_close(rows, alone, atol=1e-5, rtol=0)
    assert labelled.shape[0] == int((padded["attention_mask"].sum(1) - 1).sum())  # every labelled next token


@pytest.mark.parametrize("side", ["right", "left"])
def test_kept_logits_score_what_the_full_logits_score(lm, side):
    """``keep_logits``: the forward computes the logits of the scored positions only
    (``logits_to_keep``) and :meth:`TokenLevel.scored` reads the same rows, with the same targets,
    as from every position's logits: response positions and labelled answers, either padding side;
    the gradient reaching λ is the same, and ``<head input>`` (Expert Merging's alignment) is still
    every token's."""
    experts = lm.load()
    assert experts.task_type.keep_logits  # Llama, Mistral and GPT-2 of transformers take logits_to_keep
    merged = MergedModel(experts.model, experts.task_vectors, granularity="layer", init=0.3)
    texts = ["the movie is good", "a team won the game , yes", "world"]
    padded = padded_on(lm.tokenizer, texts, side)
    answers = torch.full_like(padded["input_ids"], -100)  # the last two real tokens of each text are its answer
    last = padded["attention_mask"].cumsum(1).argmax(1)
    for row, end in enumerate(last.tolist()):
        answers[row, end - 1 : end + 1] = padded["input_ids"][row, end - 1 : end + 1]
    for positions, labels in [("response", None), ("all", answers), ("response", answers)]:
        full = TokenLevel(next_token=True, positions=positions)
        kept = TokenLevel(next_token=True, positions=positions, keep_logits=True)
        narrow = kept.model_inputs(padded, labels)
        assert narrow["logits_to_keep"].numel() < padded["input_ids"].shape[1]
        results = []
        for task_type, inputs in [(full, padded), (kept, narrow)]:
            merged.coefficients.raw.grad = None
            logits = merged(inputs)
            assert logits.shape[1] == (inputs["logits_to_keep"].numel() if task_type is kept else padded["input_ids"].shape[1])
            rows, targets = task_type.scored(logits, inputs, labels)
            torch.logsumexp(rows, -1).sum().backward()
            results.append((rows.detach(), targets, merged.coefficients.raw.grad.clone()))
        (rows, targets, grad), (kept_rows, kept_targets, kept_grad) = results
        torch.testing.assert_close(kept_rows, rows, atol=1e-5, rtol=0)
        assert (targets is None and kept_targets is None) or torch.equal(kept_targets, targets)
        torch.testing.assert_close(kept_grad, grad, atol=1e-5, rtol=1e-4)
    narrow = kept.model_inputs(padded, None)
    with torch.no_grad():
        with merged.capture(["<head input>"]) as full_head:
            merged(padded)
        with merged.capture(["<head input>"]) as kept_head:
            merged(narrow)
    assert kept_head["<head input>"].shape[:2] == padded["input_ids"].shape  # every token's, not the kept ones'
    torch.testing.assert_close(kept_head["<head input>"], full_head["<head input>"], atol=1e-6, rtol=0)
    every = TokenLevel(next_token=True, keep_logits=True)
    assert every.model_inputs(padded) is padded  # plain language modelling scores every position
    with pytest.raises(AdamergeError, match="logits_to_keep"):
        kept.scored(merged(padded), kept.model_inputs(padded, None))  # a forward that ignored the positions


def test_response_positions_are_refused_outside_language_modelling():
    from adamerge.errors import AdamergeError

    with pytest.raises(AdamergeError, match="language modelling only"):
        TokenLevel(positions="response")
    with pytest.raises(AdamergeError, match="'all' or 'response'"):
        TokenLevel(next_token=True, positions="last")


def test_fit_exports_a_causal_lm_transformers_loads_alone(lm, tmp_path):
    output = tmp_path / "run"
    code = main(["fit", "--base", f"hf:{lm.base}", "--experts", *lm.expert_args(), "--calib", str(lm.calib),
                 "--steps", "3", "--batch-size", "4", "--max-length", "16", "--output", str(output)])  # fmt: skip
    assert code == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["files"] == {"model": "model"}
    exported = AutoModelForCausalLM.from_pretrained(output / "model").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(output / "model")
    assert tokenizer.get_vocab() == lm.tokenizer.get_vocab()
    if exported.config.tie_word_embeddings:
        assert exported.get_output_embeddings().weight is exported.get_input_embeddings().weight

    experts = lm.load()
    coefficients = json.loads((output / "coefficients.json").read_text())
    merged = MergedModel(experts.model, experts.task_vectors, granularity="block", constraint="clamp", init=0.3)
    with torch.no_grad():
        raw = torch.tensor([[coefficients[t][n] for n in merged.layout.group_names] for t in experts.tasks])
        merged.coefficients.raw.copy_(raw)
        batch = lm.batch()
        torch.testing.assert_close(exported(**batch).logits, merged(batch), atol=1e-5, rtol=0)
        plain = merged.merge_and_unload()
        if exported.config.tie_word_embeddings:
            assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight
        prompt = dict(lm.tokenizer(["the movie is"], return_tensors="pt"))
        ours = plain.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
        theirs = exported.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_an_expert_with_added_tokens_is_refused_naming_them(tmp_path):
    setup = build(tmp_path, "llama")
    other = tmp_path / "added"
    added = causal_tokenizer()
    added.add_tokens(["zebra"])  # fusion_bench#215: an expert fine-tuned with an extra token
    added.save_pretrained(other)
    model = AutoModelForCausalLM.from_pretrained(setup.experts["topic"])
    model.resize_token_embeddings(VOCAB + 1)
    model.save_pretrained(other)
    with pytest.raises(Exception, match=r"vocabulary differs from the base's.*'zebra'"):
        load_experts(f"hf:{setup.base}", {"sentiment": f"hf:{setup.experts['sentiment']}", "topic": f"hf:{other}"})


def save_lora(base: Path, folder: Path, seed: int, targets: list[str], **save: object) -> None:
    """A LoRA adapter of the causal LM at ``base`` with random (non-zero) factors, saved by peft."""
    from peft import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=2, lora_alpha=4, target_modules=targets, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0.0, 0.3)
    peft_model.save_pretrained(folder, **save)


def test_lora_adapters_stay_factored_and_equal_peft_merged_adapters(tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel

    from adamerge.core.task_vectors import FactoredDelta

    setup = build(tmp_path, "llama")
    adapter = tmp_path / "lora"
    save_lora(setup.base, adapter, seed=7, targets=["q_proj", "v_proj"])
    experts = load_experts(f"hf:{setup.base}", {"sentiment": f"peft:{adapter}", "topic": f"hf:{setup.experts['topic']}"})
    assert experts.task_vectors.is_factored("model.layers.0.self_attn.q_proj.weight")  # never densified
    assert isinstance(dict(experts.task_vectors.parts())["model.layers.0.self_attn.q_proj.weight"], FactoredDelta)
    batch = setup.batch()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup.base), adapter).merge_and_unload().eval()
    merged = MergedModel(experts.model, experts.task_vectors, granularity="task", constraint="none", init=one_hot(0, 2))
    with torch.no_grad():
        torch.testing.assert_close(merged(batch), reference(**batch).logits, atol=1e-5, rtol=1e-5)


QUESTIONS = {
    "sentiment": [("the movie is good", "yes"), ("a bad film", "no"), ("great actor", "yes"), ("the plot is bad", "no")],
    "topic": [("the team won", "sport"), ("world news", "news"), ("a great game", "sport"), ("news of the world", "news")],
}
CHAT = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}answer :{% endif %}"


def train_expert(base: Path, folder: Path, pairs: list[tuple[str, str]], tokenizer, seed: int) -> None:
    """A real fine-tune: the base trained until it answers each prompt greedily, then stops."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    rows = [tokenizer(f"{q} {a}")["input_ids"] + [tokenizer.eos_token_id] for q, a in pairs]  # [CLS] q a [SEP]
    width = max(map(len, rows))
    batch = {"input_ids": torch.tensor([r + [0] * (width - len(r)) for r in rows]),
             "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])}  # fmt: skip
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(150):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    model.eval().save_pretrained(folder)


def reference_scores(model, tokenizer, pairs, texts) -> tuple[float, float]:
    """Exact match and perplexity, one prompt / text at a time with transformers alone."""
    longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for _, a in pairs)
    hits = 0
    for question, answer in pairs:
        ids = {k: v for k, v in tokenizer(question, return_tensors="pt").items() if k != "token_type_ids"}
        out = model.generate(**ids, max_new_tokens=longest + 4, do_sample=False, pad_token_id=0, eos_token_id=3)
        new = out[0, ids["input_ids"].shape[1] :].tolist()
        new = new[: new.index(3)] if 3 in new else new
        hits += " ".join(tokenizer.decode(new, skip_special_tokens=True).split()) == answer
    nll = count = 0.0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        n = ids.shape[1] - 1
        nll, count = nll + float(model(input_ids=ids, labels=ids).loss) * n, count + n
    return hits / len(pairs), float(torch.tensor(nll / count).exp())


def test_fit_scores_generated_answers_and_perplexity(tmp_path):
    setup = build(tmp_path, "llama")
    setup.tokenizer.chat_template = CHAT
    setup.tokenizer.save_pretrained(setup.base)
    for seed, (task, pairs) in enumerate(QUESTIONS.items(), start=11):
        train_expert(setup.base, setup.experts[task], pairs, setup.tokenizer, seed)
        chats = [json.dumps({"messages": [{"role": "user", "content": q}]}) for q, _ in pairs]
        (setup.calib / task / "chats.jsonl").write_text("\n".join(chats) + "\n")
    evals = tmp_path / "eval"
    evals.mkdir()
    texts = {task: [f"{q} {a}" for q, a in pairs] for task, pairs in QUESTIONS.items()}
    for task, pairs in QUESTIONS.items():
        lines = [{"prompt": q, "answer": f" {a} "} for q, a in pairs] + [{"text": t} for t in texts[task]]
        (evals / f"{task}.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    output = tmp_path / "run"
    assert main(["fit", "--base", f"hf:{setup.base}", "--experts", *setup.expert_args(), "--calib", str(setup.calib),
                 "--eval", str(evals), "--steps", "4", "--batch-size", "4", "--max-length", "16",
                 "--output", str(output)]) == 0  # fmt: skip
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["accuracy"]["expert (alone)"] == {"sentiment": 1.0, "topic": 1.0, "average": 1.0}  # each expert learned its answers
    learned = metrics["accuracy"]["adamerging (block)"]
    exported = AutoModelForCausalLM.from_pretrained(output / "model").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(output / "model")
    with torch.no_grad():
        for task, pairs in QUESTIONS.items():
            exact, perplexity = reference_scores(exported, tokenizer, pairs, texts[task])
            assert learned[task] == pytest.approx(exact, abs=1e-6)
            assert metrics["perplexity"]["adamerging (block)"][task] == pytest.approx(perplexity, rel=1e-3)
    assert set(metrics["perplexity"]) == {"expert (alone)", "task arithmetic (λ=0.3)", "adamerging (block)"}


def test_block_granularity_gives_one_coefficient_per_decoder_block(lm):
    from adamerge.core.granularity import parse_granularity

    experts = lm.load()
    layout = parse_granularity("block").compile(list(experts.task_vectors.names))
    blocks = [g for g in layout.group_names if g.endswith((".0", ".1"))]
    assert len(blocks) == 2 and all("." in g for g in blocks)  # model.layers.0 / transformer.h.0, ...
    outside = [g for g in layout.group_names if g not in blocks]
    assert outside and all(g in experts.task_vectors.names for g in outside)  # embeddings, final norm, untied head
    for name, group in zip(layout.tensor_names, layout.tensor_groups, strict=True):
        assert (layout.group_names[group] in blocks) == any(f".{i}." in name for i in (0, 1))


def test_static_merge_of_causal_lms_exports_task_arithmetic(tmp_path):
    setup = build(tmp_path, "llama")
    evals = tmp_path / "eval"
    evals.mkdir()
    for task, prompts in PROMPTS.items():
        lines = [{"prompt": p, "answer": "yes"} for p in prompts[:2]] + [{"text": p} for p in prompts]
        (evals / f"{task}.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    output = tmp_path / "merge"
    assert main(["merge", "--method", "task-arithmetic", "--base", f"hf:{setup.base}", "--experts", *setup.expert_args(),
                 "--eval", str(evals), "--output", str(output)]) == 0  # fmt: skip
    metrics = json.loads((output / "metrics.json").read_text())
    assert set(metrics["accuracy"]["task-arithmetic"]) == {*PROMPTS, "average"}
    assert set(metrics["perplexity"]["task-arithmetic"]) == {*PROMPTS, "average"}
    base = AutoModelForCausalLM.from_pretrained(setup.base).state_dict()
    experts = [AutoModelForCausalLM.from_pretrained(p).state_dict() for p in setup.experts.values()]
    exported = AutoModelForCausalLM.from_pretrained(output / "model").state_dict()
    for name, theta in base.items():  # θ_0 + 0.3 Σ_k (θ_k − θ_0), entry by entry
        torch.testing.assert_close(exported[name], theta + 0.3 * sum(e[name] - theta for e in experts), atol=1e-6, rtol=0)


def test_few_shot_cross_entropy_is_the_loss_of_the_answers(tmp_path):
    """aTLAS few-shot on a causal LM: the training loss is transformers' own loss on the answer
    tokens (prompt tokens unlabelled), and ``--shots N`` trains on N prompt/answer records per task."""
    from adamerge.choices import IGNORE_INDEX
    from adamerge.data.generation import AnswerTokens, GenerationRecords
    from adamerge.data.texts import PadCollator
    from adamerge.objectives.task_objectives import CrossEntropy, ModelOutputs, TaskBatch

    setup = build(tmp_path, "llama")
    experts = setup.load()
    pairs = QUESTIONS["sentiment"]
    records = GenerationRecords(prompts=[q for q, _ in pairs], answers=[a for _, a in pairs], prompt_origins=["t"] * 4)
    shots = AnswerTokens(records, setup.tokenizer, max_length=16)
    encoding, labels = shots[0]
    prompt_length = len(setup.tokenizer(pairs[0][0])["input_ids"])
    assert labels[:prompt_length] == [IGNORE_INDEX] * prompt_length and labels[prompt_length:][-1] == setup.tokenizer.eos_token_id
    inputs, token_labels = PadCollator(0)([shots[i] for i in range(4)])
    merged = MergedModel(experts.model, experts.task_vectors, granularity="block", constraint="none", init=0.2)
    with torch.no_grad():  # the training step's composition: the task type's scored positions, then the objective
        positions, targets = experts.task_type.scored(merged(inputs), inputs, token_labels)  # (N, V), (N,)
        ours = CrossEntropy()("sentiment", ModelOutputs(positions), TaskBatch(inputs, targets))
        reference = merged.merge_and_unload()(**inputs, labels=token_labels).loss  # mean over labelled next tokens
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)

    for task, task_pairs in QUESTIONS.items():
        lines = [json.dumps({"prompt": q, "answer": a}) for q, a in task_pairs]
        (setup.calib / task / "shots.jsonl").write_text("\n".join(lines) + "\n")
        (setup.calib / task / "prompts.txt").unlink()
    output = tmp_path / "atlas"
    assert main(["fit", "--method", "atlas", "--shots", "2", "--base", f"hf:{setup.base}", "--experts", *setup.expert_args(),
                 "--calib", str(setup.calib), "--steps", "3", "--batch-size", "2", "--holdout", "0",
                 "--output", str(output)]) == 0  # fmt: skip
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["method"]["objective"] == "cross-entropy" and metrics["steps"] == 3


@pytest.mark.parametrize("positions", ["all", "response"])
def test_expert_alignment_at_token_level(tmp_path, positions):
    """Expert Merging on causal LMs: each expert's next-token logits (at every real token, or at
    the response's first token only) and final hidden states are cached per example; at one-hot λ
    the merged model is expert k, so its alignment loss on task k's calibration batches is 0, and
    at another λ it is not. ``fit --method expert-merging --positions ...`` runs."""
    import dataclasses

    from adamerge.core.hooks import HEAD_INPUT
    from adamerge.objectives.task_objectives import ExpertAlignment, ModelOutputs, TaskBatch, as_task_batch
    from adamerge.run.datamodules import build_datamodule
    from adamerge.run.expert_targets import ExpertTargets

    setup = build(tmp_path, "llama")
    experts = setup.load()
    experts = dataclasses.replace(experts, task_type=TokenLevel(next_token=True, positions=positions))
    data = build_datamodule(experts, setup.calib, batch_size=3, max_length=16, with_index=True)
    data.setup("fit")
    for k, task in enumerate(experts.tasks):
        for init in (one_hot(k, 2), torch.full((2,), 0.3)):
            merged = MergedModel(experts.model, experts.task_vectors, granularity="task", constraint="none", init=init)
            objective = ExpertAlignment(merged.coefficients().detach(), experts.tasks, hidden_modules=(HEAD_INPUT,))
            ExpertTargets(experts, data, merged).fill(objective)
            batch = as_task_batch(next(iter(data.calibration_loaders(shuffle=False)[task])))
            with torch.no_grad(), merged.capture(objective.hidden_modules) as hidden:
                logits = merged(batch.inputs)
            scored, _ = experts.task_type.scored(logits, batch.inputs)
            if positions == "response":
                assert scored.shape[0] == batch.size
            loss = objective(task, ModelOutputs(scored, dict(hidden)), TaskBatch(batch.inputs, None, batch.index))
            if init.sum() == 1:
                assert float(loss) < 1e-6
            else:
                assert float(loss) > 1e-4
    merged = MergedModel(experts.model, experts.task_vectors, granularity="task", constraint="none", init=0.3)
    in_memory = ExpertAlignment(merged.coefficients().detach(), experts.tasks, hidden_modules=(HEAD_INPUT,))
    on_disk = ExpertAlignment(merged.coefficients().detach(), experts.tasks, hidden_modules=(HEAD_INPUT,))
    ExpertTargets(experts, data, merged).fill(in_memory)
    ExpertTargets(experts, data, merged, memory_budget_bytes=0).fill(on_disk)  # every logit row memory-mapped
    batch = as_task_batch(next(iter(data.calibration_loaders(shuffle=False)["topic"])))
    with torch.no_grad(), merged.capture((HEAD_INPUT,)) as hidden:
        scored, _ = experts.task_type.scored(merged(batch.inputs), batch.inputs)
    outputs, task_batch = ModelOutputs(scored, dict(hidden)), TaskBatch(batch.inputs, None, batch.index)
    assert float(in_memory("topic", outputs, task_batch)) > 1e-4
    assert float(in_memory("topic", outputs, task_batch)) == float(on_disk("topic", outputs, task_batch))
    assert "logits" not in dict(on_disk.targets["topic"].named_buffers())  # stays on the host when moved
    output = tmp_path / "em"
    assert main(["fit", "--method", "expert-merging", "--base", f"hf:{setup.base}", "--experts", *setup.expert_args(),
                 "--calib", str(setup.calib), "--steps", "2", "--batch-size", "2", "--max-length", "16",
                 "--positions", positions, "--output", str(output)]) == 0  # fmt: skip


def test_bf16_autocast_learns_the_float32_coefficients(tmp_path, caplog):
    """``--precision bf16-mixed``: the forward and backward in bfloat16 autocast, λ and the merged
    weights in float32; three Adam steps move λ as float32 does, to bfloat16's rounding."""
    setup = build(tmp_path, "llama")
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        output = tmp_path / precision
        assert main(["fit", "--base", f"hf:{setup.base}", "--experts", *setup.expert_args(), "--calib", str(setup.calib),
                     "--steps", "3", "--batch-size", "4", "--max-length", "16", "--holdout", "0", "--lr", "0.01",
                     "--precision", precision, "--output", str(output)]) == 0  # fmt: skip
        table = json.loads((output / "coefficients.json").read_text())
        runs[precision] = torch.tensor([list(table[t].values()) for t in PROMPTS])
    assert (runs["32-true"] - 0.3).abs().max() > 0.02  # λ moved
    difference = (runs["bf16-mixed"] - runs["32-true"]).abs().max()
    assert 0 < difference < 0.01  # autocast ran (not bit-identical), and learned the same λ
    caplog.clear()
    code = main(["fit", "--base", f"hf:{setup.base}", "--experts", *setup.expert_args(), "--calib", str(setup.calib),
                 "--precision", "16-mixed", "--accelerator", "cpu", "--output", str(tmp_path / "fp16")])  # fmt: skip
    assert code == 2 and "--precision 16-mixed" in caplog.text and not (tmp_path / "fp16").exists()


def test_an_adapter_on_a_tied_embedding_keeps_the_expert_alone_tied(tmp_path):
    """A LoRA adapter on the embedding of a model with a tied LM head: the expert alone holds the
    adapted embedding as its head too, and equals peft's merged adapter."""
    pytest.importorskip("peft")
    from peft import PeftModel

    setup = build(tmp_path, "llama")
    adapter = tmp_path / "lora-embedding"
    save_lora(setup.base, adapter, seed=5, targets=["embed_tokens", "q_proj"], save_embedding_layers=False)  # factors only
    experts = load_experts(f"hf:{setup.base}", {"sentiment": f"peft:{adapter}", "topic": f"hf:{setup.experts['topic']}"})
    alone = experts.expert_model("sentiment")
    assert alone.get_output_embeddings().weight is alone.get_input_embeddings().weight
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup.base), adapter).merge_and_unload().eval()
    batch = setup.batch()
    with torch.no_grad():
        torch.testing.assert_close(alone(**batch).logits, reference(**batch).logits, atol=1e-5, rtol=1e-5)


def test_a_fit_too_short_to_move_its_coefficients_says_so(tmp_path, caplog):
    """Adam moves λ by at most about lr per step: AdaMerging's 1e-3 over 3 steps cannot leave its
    start, and the run warns with the bound and the steps the lr suits; lr 0.1 does not warn."""
    from adamerge.methods import get_method

    assert get_method("adamerging").reach(500) == pytest.approx(0.5)
    assert get_method("expert-merging").reach(4) == pytest.approx(0.5)  # lr 0.5 through a sigmoid (slope ≤ ¼)
    setup = build(tmp_path, "llama")
    for lr, warned in ((None, True), ("0.1", False)):
        caplog.clear()
        output = tmp_path / f"lr-{lr}"
        argv = ["fit", "--base", f"hf:{setup.base}", "--experts", *setup.expert_args(), "--calib", str(setup.calib),
                "--steps", "3", "--batch-size", "2", "--max-length", "16", "--eval-init", "false", "--output", str(output)]
        assert main(argv + (["--lr", lr] if lr else [])) == 0  # fmt: skip
        assert ("moves each λ by at most 0.003" in caplog.text and "about 100 steps" in caplog.text) is warned


def test_gradient_checkpointing_recomputes_blocks_with_the_merged_weights(lm):
    """Checkpointed decoder blocks give the same ∂L/∂λ as plain ones (the recomputation in
    backward runs on the merged θ′, not on the module's own θ₀) while autograd keeps fewer
    activations; outside gradient recording nothing changes."""
    from adamerge.core.block_checkpointing import repeated_blocks
    from adamerge.objectives import losses

    experts = lm.load()
    assert len(repeated_blocks(experts.model)) == 2
    batch = lm.batch()
    grads, saved = {}, {}
    for checkpointed in (False, True):
        merged = MergedModel(experts.model, experts.task_vectors, granularity="layer", init=0.3)
        if checkpointed:
            assert merged.checkpoint_blocks() == 2
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel() * t.element_size()) or t, lambda t: t):
            scored, _ = experts.task_type.scored(merged(batch), batch)
        losses.entropy(scored).backward()
        grads[checkpointed], saved[checkpointed] = merged.coefficients.raw.grad.clone(), sum(kept)
        with torch.no_grad():
            plain = merged(batch)
        torch.testing.assert_close(plain, MergedModel(experts.model, experts.task_vectors, init=0.3)(batch))
    assert grads[False].abs().sum() > 0
    torch.testing.assert_close(grads[True], grads[False], atol=1e-6, rtol=1e-5)
    assert saved[True] < saved[False]
    assert all("forward" not in block.__dict__ for block in repeated_blocks(experts.model))  # put back


def test_fit_with_gradient_checkpointing_learns_the_same_coefficients(tmp_path, caplog):
    """``--gradient-checkpointing true`` learns λ as without it; LoRA experts (merged at use time)
    are refused with one line and exit code 2."""
    import logging

    caplog.set_level(logging.INFO, logger="adamerge")
    setup = build(tmp_path, "llama")
    runs = {}
    for flag in ([], ["--gradient-checkpointing", "true"]):
        output = tmp_path / f"run{len(flag)}"
        assert main(["fit", "--base", f"hf:{setup.base}", "--experts", *setup.expert_args(), "--calib", str(setup.calib),
                     "--steps", "3", "--batch-size", "4", "--max-length", "16", "--holdout", "0", "--lr", "0.01",
                     "--eval-init", "false", "--output", str(output), *flag]) == 0  # fmt: skip
        table = json.loads((output / "coefficients.json").read_text())
        runs[len(flag)] = torch.tensor([list(table[t].values()) for t in PROMPTS])
    assert "2 blocks recompute their activations" in caplog.text
    assert (runs[0] - 0.3).abs().max() > 0.02
    torch.testing.assert_close(runs[2], runs[0], atol=1e-6, rtol=0)
    adapters = {}
    for seed, task in enumerate(PROMPTS, start=1):
        adapters[task] = tmp_path / f"lora-{task}"
        save_lora(setup.base, adapters[task], seed, ["q_proj", "v_proj"])
    caplog.clear()
    code = main(["fit", "--base", f"hf:{setup.base}", "--experts", *[f"{t}=peft:{p}" for t, p in adapters.items()],
                 "--calib", str(setup.calib), "--steps", "1", "--max-length", "16", "--gradient-checkpointing", "true",
                 "--output", str(tmp_path / "lora-run")])  # fmt: skip
    assert code == 2 and "merged at use time" in caplog.text and not (tmp_path / "lora-run").exists()


def test_positions_auto_scores_the_response_when_every_calibration_record_is_a_prompt(tmp_path, caplog):
    """``--positions auto`` (the default): ``{"prompt"}`` records and chats awaiting the assistant
    are prompts, scored at the response's first token (the same λ as ``--positions response``);
    ``.txt`` lines are documents, every token scored (as ``--positions all``); a run mixing both
    scores every token and says which tasks hold documents."""
    import logging

    caplog.set_level(logging.INFO, logger="adamerge")
    setup = build(tmp_path, "llama")
    prompts = tmp_path / "prompts"
    for task, texts in PROMPTS.items():
        (prompts / task).mkdir(parents=True)
        records = [{"prompt": t} for t in texts] * 2 + [{"messages": [{"role": "user", "content": t}]} for t in texts[:1]]
        (prompts / task / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    setup.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}yes{% endif %}"
    setup.tokenizer.save_pretrained(setup.base)

    def fit(calib: Path, *extra: str) -> torch.Tensor:
        output = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
        assert main(["fit", "--base", f"hf:{setup.base}", "--experts", *setup.expert_args(), "--calib", str(calib),
                     "--steps", "2", "--batch-size", "4", "--max-length", "16", "--holdout", "0", "--lr", "0.05",
                     "--eval-init", "false", "--output", str(output), *extra]) == 0  # fmt: skip
        table = json.loads((output / "coefficients.json").read_text())
        return torch.tensor([list(table[t].values()) for t in PROMPTS])

    auto_prompts = fit(prompts)
    assert "positions: response" in caplog.text
    torch.testing.assert_close(auto_prompts, fit(prompts, "--positions", "response"), atol=0, rtol=0)
    assert not torch.allclose(auto_prompts, fit(prompts, "--positions", "all"))
    caplog.clear()
    torch.testing.assert_close(fit(setup.calib), fit(setup.calib, "--positions", "all"), atol=0, rtol=0)
    assert "positions: response" not in caplog.text
    (prompts / "topic" / "documents.txt").write_text("the team won\n")
    caplog.clear()
    fit(prompts)
    assert "positions: all (the calibration of topic holds documents" in caplog.text
