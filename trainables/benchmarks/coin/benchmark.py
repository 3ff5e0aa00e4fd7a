"""The CoIN benchmark at real scale: imported Parquet data, greedy answers, image-generation scores.

:class:`CoinBenchmark` has the interface the engine uses for any benchmark: ``ids``,
``train_set(task)``, ``stream`` (image-only distillation sequences) and ``evaluate(model, stage)``
→ (answer accuracy per task, generation scores). Answers are decoded greedily over the text
vocabulary (image codebook masked, as the paper's text inference) until end-of-sequence or
``coin.max_new_tokens``, then scored with :mod:`trainables.benchmarks.coin.scoring`.

Generation scores on the held-out generation split, always (teacher-forced, no sampling):
``nll`` — mean image-token NLL over the image span (begin-image … end-image) given the caption;
``accuracy`` — share of those image tokens the model predicts as its top-1 (over the image
vocabulary), higher is better, so ``inter_modal_forgetting`` = its drop from the base model.

Sampled text-to-image scores, when ``coin.vqgan`` and ``coin.clip_model`` are set (the paper's
inter-modal columns): for up to ``coin.t2i_prompts`` held-out captions, an image is sampled from
``<s> caption <sep> begin-image`` (:func:`trainables.benchmarks.coin.t2i.sample_image_tokens`: 1,024 codebook
tokens for the 7B model, ``do_sample`` with ``coin.t2i_temperature``/``t2i_top_k``, seed
``coin.t2i_seed``; MoDE routes the caption to the T-MoE and the image tokens to the V-Adapter, as
in training), decoded to pixels by Chameleon's VQGAN decoder (:mod:`trainables.benchmarks.coin.vqgan`) and scored
with CLIP (:mod:`trainables.benchmarks.coin.clip_scores`):
``text_align`` ↑ — cosine of each image's CLIP embedding with its caption's;
``image_align`` ↑ — mean cosine of each image to every reference image;
``fd_clip`` ↓ — Fréchet distance of CLIP image embeddings, generated vs reference (not Inception FID).
References are the images in ``coin.reference_images``, or else the VQGAN reconstructions of the
held-out generation images' own tokens. ``frechet`` is ``fd_clip`` when these scores are on, and
NaN otherwise: transformers' ``ChameleonVQVAE`` has no decoder (the HF checkpoints hold the encoder
only), so pixels need Meta's separate VQGAN checkpoint.

Sharded evaluation (``sharded_eval``): with ``resources.num_workers > 1`` the engine calls
``evaluate(..., dist=Distributed())`` on every rank, and each rank does an interleaved share
(``dist.shard``) of every part: the greedy answers of each task's test prompts (per-sample hits
gathered in order), the teacher-forced image-token scores (``(nll_sum, correct, count)`` gathered),
the sampled images (each prompt's generator seeded by its *global* index, so the images are the
single-process ones) and the VQGAN reference reconstructions (CLIP embeddings gathered, so the
alignments and ``fd_clip`` use the full sets). Sums are taken in rank order on every rank and every
rank returns rank 0's copy, so all ranks agree; the results equal the single-process ones up to
float round-off of different batch compositions (greedy decoding and sampling are left-padded with
explicit positions, so a prompt's tokens do not depend on its batch).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trainables.adapter_budget import ModelShape, TrainingShape, check_adapter_fits
from trainables.batching import SampleSet
from trainables.benchmarks.coin.chameleon import DTYPES, load_chameleon, tokens_per_image
from trainables.benchmarks.coin.decoding import greedy_decode
from trainables.benchmarks.coin.records import CoinInputError
from trainables.benchmarks.coin.scoring import is_correct
from trainables.benchmarks.coin.sharding import gather, in_order, model_device, rows_in_order, shard_indices
from trainables.benchmarks.coin.store import (
    GENERATION,
    check_manifest_vocabulary,
    read_manifest,
    read_split,
    vocabulary_hash,
)
from trainables.config import RunConfig
from trainables.losses import answer_labels, unwrap
from trainables.mode.checkpointing import enable_activation_checkpointing
from trainables.vocab import TokenIds


@torch.no_grad()
def image_token_sums(
    model: nn.Module, samples: SampleSet, ids: TokenIds, batch_size: int = 4, indices: Sequence[int] | None = None
) -> tuple[float, int, int]:
    """(NLL sum, correct, count) over the image-span tokens of the samples ``indices`` (all by
    default); see :func:`image_token_scores`."""
    indices = list(range(len(samples))) if indices is None else list(indices)
    lm = unwrap(model)
    device = model_device(model)
    vocab_ids = ids.image_vocab_mask(device).nonzero().squeeze(-1)
    column_of = torch.full((ids.vocab_size,), -100, dtype=torch.long, device=device)
    column_of[vocab_ids] = torch.arange(len(vocab_ids), device=device)
    weight = lm.lm_head.weight[vocab_ids]
    total_nll, correct, count = 0.0, 0, 0
    for start in range(0, len(indices), batch_size):
        batch = samples.batch(indices[start : start + batch_size])
        input_ids, attention = batch.input_ids.to(device), batch.attention_mask.to(device)
        hidden = lm.model(input_ids=input_ids, attention_mask=attention, use_cache=False).last_hidden_state
        logits = F.linear(hidden[:, :-1], weight).float()
        labels = answer_labels(input_ids, attention, ids.separator)[:, 1:]
        targets = torch.where(labels >= 0, column_of[labels.clamp_min(0)], labels)
        labelled = targets >= 0
        total_nll += float(F.cross_entropy(logits[labelled], targets[labelled], reduction="sum"))
        correct += int((logits[labelled].argmax(-1) == targets[labelled]).sum())
        count += int(labelled.sum())
    return total_nll, correct, count


def image_token_scores(
    model: nn.Module, samples: SampleSet, ids: TokenIds, batch_size: int = 4, dist=None
) -> tuple[float, float]:
    """(mean NLL, top-1 accuracy) of the image-span tokens of generation sequences, each predicted
    over the image vocabulary only (codebook + begin/end-image). Logits are computed for those
    8,194 ids alone, which keeps 2,048-token sequences cheap on a 65,536-id model. With ``dist``,
    each rank scores its shard of the samples and the sums are gathered (added in rank order)."""
    parts = gather(dist, image_token_sums(model, samples, ids, batch_size, shard_indices(dist, len(samples))))
    total_nll, correct, count = 0.0, 0, 0
    for nll_sum, hits, tokens in parts:
        total_nll, correct, count = total_nll + nll_sum, correct + hits, count + tokens
    if count == 0:
        return math.nan, math.nan
    return total_nll / count, correct / count


class CoinBenchmark:
    """CoIN tasks and the generation stream imported by ``mode-cl data import-coin``.

    ``sharded_eval``: :meth:`evaluate` takes the trial's ``dist`` and splits the work across its
    workers (every rank must call it; all return the same result, that of a single process up to
    float round-off), see the module docstring."""

    sharded_eval = True

    def __init__(self, config: RunConfig, model_config, log=print) -> None:
        coin = config.coin
        self.config, self.coin, self.log = config, coin, log
        self.data_dir = Path(coin.data_dir)
        manifest = read_manifest(self.data_dir)
        self.ids = TokenIds.from_vocabulary_map(
            model_config.vocabulary_map, vocab_size=model_config.vocab_size, separator=coin.separator_token
        )
        check_manifest_vocabulary(
            manifest, self.data_dir, vocabulary_hash(model_config.vocabulary_map, coin.separator_token)
        )
        for task in config.tasks:
            splits = manifest.get("tasks", {}).get(task, {})
            for split in ("train", "test"):
                if split not in splits:
                    known = ", ".join(sorted(manifest.get("tasks", {}))) or "none"
                    raise CoinInputError(
                        f"tasks: {task!r} has no {split} split in {self.data_dir} (imported tasks: {known}); "
                        f"import it with `mode-cl data import-coin --task {task} --{split} FILE`"
                    )
        if GENERATION not in manifest or "stream" not in manifest[GENERATION]:
            raise CoinInputError(
                f"{self.data_dir}: no image-generation stream; "
                "import one with `mode-cl data import-coin --generation FILE`"
            )
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.data_dir / "tokenizer")
        self.truncated = 0
        stream_table = read_split(self.data_dir, GENERATION, "stream")
        rows, starts = stream_table.column("input_ids").to_pylist(), stream_table.column("answer_start").to_pylist()
        spans = [row[start:] for row, start in zip(rows, starts, strict=True)]
        self.stream = SampleSet(spans, [True] * len(spans), self.ids.pad)
        self.generation_table = (
            read_split(self.data_dir, GENERATION, "test", coin.eval_limit) if "test" in manifest[GENERATION] else None
        )
        self.test_generation = self._samples(self.generation_table) if self.generation_table is not None else None
        self.tokens_per_image = tokens_per_image(model_config)
        self.vocabulary_map = dict(model_config.vocabulary_map)
        self._t2i: dict | None = None  # decoder, CLIP scorer and reference embeddings, loaded on first use
        if coin.vqgan is not None:
            if not Path(coin.vqgan).expanduser().is_file():
                raise CoinInputError(
                    f"coin.vqgan: {coin.vqgan} does not exist; point it at Chameleon's tokenizer/vqgan.ckpt "
                    "(or its converted .safetensors), or unset vqgan and clip_model"
                )
            if coin.reference_images is not None and not Path(coin.reference_images).expanduser().is_dir():
                raise CoinInputError(
                    f"coin.reference_images: {coin.reference_images} is not a directory; "
                    "point it at reference images or unset it to use VQGAN reconstructions"
                )
        self.tests = {task: read_split(self.data_dir, task, "test", coin.eval_limit) for task in config.tasks}

    def _truncate(self, sequence: list[int]) -> list[int]:
        # As the paper: sequences are cut at max_length (an answer cut off contributes fewer labels).
        if len(sequence) > self.coin.max_length:
            self.truncated += 1
            return sequence[: self.coin.max_length]
        return sequence

    def _samples(self, table) -> SampleSet:
        sequences = [self._truncate(s) for s in table.column("input_ids").to_pylist()]
        return SampleSet(sequences, table.column("is_generation").to_pylist(), self.ids.pad)

    def load_base_model(self) -> nn.Module:
        coin = self.coin
        return load_chameleon(coin.model, coin.dtype, coin.attn_implementation, "coin.model")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        if self.coin.gradient_checkpointing:
            enable_activation_checkpointing(model)
        return model

    def train_set(self, task: str) -> SampleSet:
        before = self.truncated
        samples = self._samples(read_split(self.data_dir, task, "train"))
        if self.truncated > before:
            self.log(f"[yellow]{task}: {self.truncated - before} train sequences cut to {self.coin.max_length} tokens")
        return samples

    def _shard_answers(self, model: nn.Module, task: str, dist=None) -> tuple[list[int], list[str]]:
        """This rank's test indices of ``task`` and its greedy responses to them."""
        table = self.tests[task]
        rows, starts = table.column("input_ids").to_pylist(), table.column("answer_start").to_pylist()
        mine = shard_indices(dist, len(rows))
        prompts = [self._truncate(rows[i][: starts[i]]) for i in mine]
        generated = greedy_decode(model, prompts, self.ids, self.coin.max_new_tokens, self.coin.eval_batch_size)
        return mine, [self.tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in generated]

    def answers(self, model: nn.Module, task: str, dist=None) -> list[str]:
        """Greedy responses to ``task``'s test prompts (text up to end-of-sequence), in test order;
        with ``dist`` each rank decodes its shard and every rank gets all responses."""
        table = self.tests[task]
        return in_order(dist, table.num_rows, *self._shard_answers(model, task, dist))

    def accuracy(self, model: nn.Module, task: str, dist=None) -> float:
        """Share of ``task``'s test prompts answered correctly; with ``dist`` each rank decodes and
        scores its shard and the per-sample hits are gathered."""
        table = self.tests[task]
        mine, responses = self._shard_answers(model, task, dist)
        questions, references = table.column("question").to_pylist(), table.column("answers").to_pylist()
        hits = [
            is_correct(task, response, references[i], questions[i]) for i, response in zip(mine, responses, strict=True)
        ]
        hits = in_order(dist, table.num_rows, mine, hits)
        return sum(hits) / len(hits)

    def _t2i_parts(self, device: torch.device, dist=None) -> dict:
        """VQGAN decoder, CLIP scorer and reference embeddings (model-independent: built once; with
        ``dist`` each rank embeds its shard of the reference images and the embeddings are gathered)."""
        if self._t2i is not None:
            return self._t2i
        from trainables.benchmarks.coin.clip_scores import ClipScorer, load_reference_images
        from trainables.benchmarks.coin.vqgan import ImageCodeMap, load_vqgan_decoder

        coin = self.coin
        decoder = load_vqgan_decoder(coin.vqgan, device=device)
        if decoder.config.tokens_per_image != self.tokens_per_image:
            raise CoinInputError(
                f"coin.vqgan: the decoder makes images of {decoder.config.tokens_per_image} codes but the model's "
                f"VQ-VAE uses {self.tokens_per_image}; use the VQGAN of the same Chameleon release"
            )
        scorer = ClipScorer(coin.clip_model, device=device, batch_size=coin.eval_batch_size)
        code_map = ImageCodeMap(self.vocabulary_map)
        parts = {"decoder": decoder, "scorer": scorer, "code_map": code_map}
        if coin.reference_images is not None:
            images = load_reference_images(coin.reference_images)
            mine = shard_indices(dist, len(images))
            reference = rows_in_order(dist, len(images), mine, scorer.image_embeddings([images[i] for i in mine]))
        else:  # the held-out images themselves, as the VQGAN reconstructs them from their tokens
            spans = []
            for row, start in zip(*self._generation_columns("input_ids", "answer_start"), strict=True):
                span = [t for t in row[start:] if t not in (self.ids.begin_image, self.ids.end_image)]
                if len(span) == self.tokens_per_image:
                    spans.append(span)
            mine = shard_indices(dist, len(spans))
            reference = rows_in_order(dist, len(spans), mine, self._embed_codes(parts, [spans[i] for i in mine]))
        parts["reference"] = reference
        if dist is None or dist.rank == 0:
            self.log(f"t2i scoring: VQGAN {coin.vqgan}, CLIP {coin.clip_model}, {len(reference)} reference images")
        self._t2i = parts
        return parts

    def _generation_columns(self, *names: str) -> list[list]:
        table = self.generation_table
        return [table.column(name).to_pylist() for name in names]

    def _embed_codes(self, parts: dict, spans: list[list[int]]) -> torch.Tensor:
        """CLIP embeddings of the images decoded from BPE code spans, a few images at a time."""
        chunk = max(1, min(4, self.coin.eval_batch_size))
        out = [torch.empty(0, parts["scorer"].model.config.projection_dim)]
        for start in range(0, len(spans), chunk):
            codes = parts["code_map"].codes(spans[start : start + chunk])
            out.append(parts["scorer"].image_embeddings(parts["decoder"].decode(codes)))
        return torch.cat(out)

    def t2i_scores(self, model: nn.Module, dist=None) -> dict[str, float]:
        """``text_align``, ``image_align``, ``fd_clip`` of images sampled for held-out captions.
        With ``dist`` each rank samples and embeds its shard of the prompts (each seeded by its
        global index) and the CLIP embeddings are gathered, so the scores use the full set."""
        from trainables.benchmarks.coin.t2i import sample_image_tokens, span_codes

        nan = {"text_align": math.nan, "image_align": math.nan, "fd_clip": math.nan}
        if self.generation_table is None:
            return nan
        coin = self.coin
        rows, starts, captions = self._generation_columns("input_ids", "answer_start", "question")
        chosen = [i for i, caption in enumerate(captions) if caption and caption.strip()][: coin.t2i_prompts]
        if not chosen:
            if dist is None or dist.rank == 0:
                self.log("[yellow]t2i scoring: no held-out generation record has a caption; scores are NaN")
            return nan
        parts = self._t2i_parts(model_device(model), dist)
        mine = shard_indices(dist, len(chosen))  # positions in `chosen`: they seed the prompts' generators
        prompts = [rows[chosen[p]][: starts[chosen[p]]] for p in mine]  # <s> caption <sep>
        spans = sample_image_tokens(
            model,
            prompts,
            self.ids,
            self.tokens_per_image,
            temperature=coin.t2i_temperature,
            top_k=coin.t2i_top_k,
            seed=coin.t2i_seed,
            batch_size=coin.eval_batch_size,
            indices=mine,
        )
        generated = self._embed_codes(parts, span_codes(spans, self.ids, self.tokens_per_image))
        generated = rows_in_order(dist, len(chosen), mine, generated)
        return parts["scorer"].scores(generated, [captions[i] for i in chosen], parts["reference"])

    def evaluate(
        self,
        model: nn.Module,
        stage: int,
        tasks: Sequence[int] | None = None,
        generation: bool = True,
        dist=None,
    ) -> tuple[list[float], dict[str, float]]:
        """Answer accuracy for the tasks in ``tasks`` (all when None; NaN for the others) and, if
        ``generation``, the generation scores (else NaN). With ``dist`` (a
        :class:`trainables.distributed.Distributed` of world > 1) every rank must call this: each
        evaluates its shard and all return the same result."""
        model.eval()
        wanted = range(len(self.config.tasks)) if tasks is None else tasks
        row = [
            self.accuracy(model, task, dist) if i in wanted else math.nan for i, task in enumerate(self.config.tasks)
        ]
        nll, top1 = math.nan, math.nan
        scores = {"accuracy": top1, "frechet": math.nan, "nll": nll}
        if generation:
            if self.test_generation is not None:
                nll, top1 = image_token_scores(model, self.test_generation, self.ids, self.coin.eval_batch_size, dist)
            scores = {"accuracy": top1, "frechet": math.nan, "nll": nll}
            if self.coin.vqgan is not None and self.coin.clip_model is not None:
                sampled = self.t2i_scores(model, dist)
                scores |= sampled | {"frechet": sampled["fd_clip"]}
        if dist is not None and dist.world > 1:  # identical by construction; rank 0's copy makes it exact
            row, scores = dist.from_rank0((row, scores))
        return row, scores


def prepare(config: RunConfig, work_dir: Path, show_progress: bool = True) -> None:
    """Nothing to build on the driver: the data are imported beforehand by ``mode-cl data import-coin``
    and the model is read from its checkpoint."""


def _model_config(config: RunConfig):
    """The checkpoint's ``ChameleonConfig`` (read without loading weights)."""
    from transformers import ChameleonConfig

    from trainables.benchmarks.coin.chameleon import resolve_model_dir

    return ChameleonConfig.from_pretrained(resolve_model_dir(config.coin.model, "coin.model"))


def open(
    config: RunConfig,
    work_dir: Path,
    log: Callable[[str], None] = print,
    show_progress: bool = True,
    timer: Callable[[str], contextlib.AbstractContextManager] | None = None,
) -> CoinBenchmark:
    timer = timer or (lambda phase: contextlib.nullcontext())
    torch.manual_seed(config.seed)
    with timer("benchmark"):
        return CoinBenchmark(config, _model_config(config), log)


def check_inputs(config: RunConfig) -> None:
    """Fail before anything starts if the model or the imported data are unusable: opening the
    benchmark reads the model's config and checks every task and split against the manifest
    (:class:`ModelSourceError` / :class:`CoinInputError`, both one-line user errors), and the
    adapter against the checkpoint's widths and this machine's memory (a :class:`ConfigError`)."""
    model_config = _model_config(config)
    coin = config.coin
    ids = TokenIds.from_vocabulary_map(
        model_config.vocabulary_map, vocab_size=model_config.vocab_size, separator=coin.separator_token
    )
    shape = TrainingShape(
        model=ModelShape(
            model_config.hidden_size,
            model_config.intermediate_size,
            model_config.num_hidden_layers,
            model_config.vocab_size,
            len(ids.image_codes) + 2,  # codebook + begin/end-image
        ),
        dtype_bytes=DTYPES[coin.dtype].itemsize,
        micro_batch=-(-config.train.batch_size // config.resources.num_workers),
        seq_len=coin.max_length,
        stream_len=tokens_per_image(model_config) + 2,
        checkpointing=coin.gradient_checkpointing,
        use_gpu=config.resources.use_gpu,
        weights_field="coin.model",
        weights_fix="use a smaller model or a machine with more memory",
        activations_fix="lower train.batch_size or coin.max_length, or use more workers or coin.gradient_checkpointing",
    )
    check_adapter_fits(config.method, shape)
    CoinBenchmark(config, model_config, log=lambda message: None)
