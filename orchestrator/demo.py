"""``mode-cl demo``: a quick, real check of every method on the tiny Chameleon (no Ray, no data).

Each method starts from the same random tiny Chameleon, trains on a fixed toy understanding batch
(image + question → answer word) with its own losses, and is measured on a held-out
text-to-image batch: the image-token NLL change from the base model is a small-scale view of
inter-modal forgetting. MoDE's invariants (attached == base at init, teacher == base after
training) are checked on the way and a failure exits non-zero.
"""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.table import Table

from trainables.losses import answer_labels, causal_lm_logits, label_space, restrict_logits, shifted_cross_entropy
from trainables.methods import METHODS, Batch, MethodConfig, StreamBatch, build_method
from trainables.tiny import TinyChameleonConfig, build_tiny_chameleon, make_vocabulary_map
from trainables.vocab import TokenIds

WORDS = ("what", "is", "shown", "draw", "a", "b", "c", "d")
NUM_CODES = 32
IMAGE_LENGTH = 16


def _toy_batches(ids: TokenIds, vocab: dict[str, int], seed: int) -> tuple[Batch, Batch, StreamBatch]:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.tensor(ids.image_codes)
    letters = ["a", "b", "c", "d"]
    prototypes = [codes[torch.randint(len(codes), (IMAGE_LENGTH,), generator=generator)] for _ in letters]

    def image(letter: int) -> list[int]:
        noisy = prototypes[letter].clone()
        flip = torch.rand(IMAGE_LENGTH, generator=generator) < 0.2
        noisy[flip] = codes[torch.randint(len(codes), (int(flip.sum()),), generator=generator)]
        return [ids.begin_image, *noisy.tolist(), ids.end_image]

    def understanding(letter: int) -> list[int]:
        question = [vocab["what"], vocab["is"], vocab["shown"]]
        return [ids.bos, *image(letter), *question, ids.separator, vocab[letters[letter]], ids.eos]

    def generation(letter: int) -> list[int]:
        return [ids.bos, vocab["draw"], vocab[letters[letter]], ids.separator, *image(letter)]

    task = torch.tensor([understanding(i % 4) for i in range(16)])
    held_out = torch.tensor([generation(i % 4) for i in range(16)])
    stream = torch.tensor([image(i % 4) for i in range(16)])
    ones = torch.ones_like
    return (
        Batch(task, ones(task), torch.zeros(len(task), dtype=torch.bool)),
        Batch(held_out, ones(held_out), torch.ones(len(held_out), dtype=torch.bool)),
        StreamBatch(stream, ones(stream)),
    )


@torch.no_grad()
def _image_nll(model, batch: Batch, ids: TokenIds) -> float:
    logits = restrict_logits(causal_lm_logits(model, batch.input_ids), label_space(ids, batch.is_generation))
    return shifted_cross_entropy(logits, answer_labels(batch.input_ids, batch.attention_mask, ids.separator)).item()


def run_demo(steps: int = 30, seed: int = 0) -> int:
    console = Console()
    torch.manual_seed(seed)
    vocab = make_vocabulary_map(WORDS, NUM_CODES)
    ids = TokenIds.from_vocabulary_map(vocab)
    arch = TinyChameleonConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    task, held_out, stream = _toy_batches(ids, vocab, seed)
    base_nll = _image_nll(build_tiny_chameleon(vocab, arch, seed), held_out, ids)

    table = Table(title=f"mode-cl demo: {steps} steps per method on the tiny Chameleon (seed {seed})")
    for column in ("method", "task loss start → end", "image NLL change", "KD (last)", "checks", "seconds"):
        table.add_column(column, justify="right" if column != "method" else "left")
    failures = 0
    for name in METHODS:
        started = time.perf_counter()
        base = build_tiny_chameleon(vocab, arch, seed)
        with torch.no_grad():
            base_logits = causal_lm_logits(base, task.input_ids)
        method = build_method(MethodConfig(name=name, r=4, num_experts=4), ids)
        model = method.attach(build_tiny_chameleon(vocab, arch, seed)).eval()
        checks = []
        with torch.no_grad():
            checks.append(torch.equal(causal_lm_logits(model, task.input_ids), base_logits))
        model.train()
        optimizer = torch.optim.AdamW(method.trainable_parameters(model), lr=3e-3)
        first = last = None
        kd = float("nan")
        for _ in range(steps):
            terms = method.loss_terms(model, task, stream)
            loss = sum(terms.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            first = terms["task"].item() if first is None else first
            last = terms["task"].item()
            kd = terms["kd"].item() if "kd" in terms else kd
        model.eval()
        with torch.no_grad(), method.teacher(model):
            checks.append(torch.equal(causal_lm_logits(model, task.input_ids), base_logits))
        ok = all(checks) and last < first
        failures += not ok
        table.add_row(
            name,
            f"{first:.3f} → {last:.3f}",
            f"{_image_nll(model, held_out, ids) - base_nll:+.3f}",
            "—" if kd != kd else f"{kd:.4f}",
            "ok" if ok else "FAILED",
            f"{time.perf_counter() - started:.1f}",
        )
    console.print(table)
    console.print(
        "image NLL change: held-out text-to-image NLL after training minus the base model's "
        f"({base_nll:.3f}); positive = generation got worse. checks: attached == base at init, "
        "teacher == base after training, task loss went down."
    )
    return 1 if failures else 0
