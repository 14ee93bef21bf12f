"""Data order and micro-batches. The order is a pure function of (seed, epoch), so a resumed run
sees exactly the batches an uninterrupted one would.

A *unit* is what one row of a micro-batch holds: one example (padded batches) or one bin of
examples (packing; the bins are packed once over the whole set, so they do not depend on the
split either). The examples of an optimizer step are a function of seed, epoch and the global
batch (micro-batch x accumulation x ranks) only; the step is then cut into micro-batches and each
micro-batch strided over the ranks. Halving the micro-batch and doubling the accumulation trains
the same steps. Every epoch ends a step (its last step may be short). Micro-batches are counted
globally: micro-batch k of the run is micro-batch k % micro_per_epoch of epoch k // micro_per_epoch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from sftkit.arch.packed_attention import offsets
from sftkit.arch.vision import Vision, mrope_positions
from sftkit.data.images import pixels, stand_in
from sftkit.data.render import IGNORE_INDEX

GROUP_SPAN = 64  # length grouping sorts within windows of 64 optimizer steps: little padding, still random


def bfd_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: longest example first, into the fullest bin it still fits."""
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted
    for i in order:
        pos = bisect.bisect_left(free, (lengths[i], -1))
        if pos < len(free):
            space, b = free.pop(pos)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - lengths[i] > 0:
            bisect.insort(free, (space - lengths[i], b))
    return bins


@dataclass
class MicroBatch:
    inputs: dict[str, torch.Tensor | int]  # what the model's forward takes (ints: varlen's longest example)
    keep: torch.Tensor                 # [rows, width] bool: the next token is supervised
    targets: torch.Tensor              # those next tokens, row-major (the order logits come out in)
    tokens: int                        # real (non-pad) tokens
    slots: int                         # rows * width, padding included
    attn_pairs: int = 0                # sum of length^2 over examples: the attention's share of FLOPs
    # [rows, width]: which example of this micro-batch each token belongs to, -1 for padding and
    # weight-0 rows; and each example's token count. Per-example terms (the MoE balance loss) read them.
    segments: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    # A vision-language run's micro-batch without an image: a stand-in image's pixel_values and grid,
    # which the loss runs through the vision tower and adds times 0 (loss.forward_loss), so that every
    # rank's tower runs once a micro-batch (ZeRO-3 and FSDP2 gather its weights on each, DDP waits
    # for the gradients of a trained merger).
    stand_in_pixels: torch.Tensor | None = None
    stand_in_grid: torch.Tensor | None = None

    @property
    def counted_tokens(self) -> int:
        """Tokens of the examples that count (no padding, no weight-0 stand-in)."""
        return int(self.lengths.sum()) if self.lengths is not None else self.tokens

    def to(self, device) -> MicroBatch:
        move = {"device": device, "non_blocking": True}  # from pinned memory the copy overlaps compute
        return dataclasses.replace(self, inputs={k: v.to(**move) if torch.is_tensor(v) else v
                                                 for k, v in self.inputs.items()},
                                   keep=self.keep.to(**move), targets=self.targets.to(**move),
                                   **{k: getattr(self, k).to(**move) for k in PER_EXAMPLE if getattr(self, k) is not None})

    def pin_memory(self) -> MicroBatch:  # called by the DataLoader's pinning thread
        return dataclasses.replace(self, inputs={k: v.pin_memory() if torch.is_tensor(v) else v
                                                 for k, v in self.inputs.items()},
                                   keep=self.keep.pin_memory(), targets=self.targets.pin_memory(),
                                   **{k: getattr(self, k).pin_memory() for k in PER_EXAMPLE
                                      if getattr(self, k) is not None})


PER_EXAMPLE = ("segments", "lengths", "stand_in_pixels", "stand_in_grid")  # MicroBatch's optional tensors


class Schedule:
    """Which examples every rank sees in every micro-batch of the run.

    Length grouping (without packing) sorts windows of GROUP_SPAN whole steps by length, cuts them
    into steps and shuffles the steps; a step's units are sorted longest first, so its micro-batches
    hold similar lengths. It moves examples between steps only through the window, whose size
    counts steps, so the split never changes which examples a step trains on."""

    def __init__(self, lengths: list[int], per_device: int, world: int, accumulation: int, seed: int,
                 packing: bool = False, max_length: int = 0, group_by_length: bool = True):
        self.units = bfd_bins(lengths, max_length) if packing else [[i] for i in range(len(lengths))]
        self.unit_len = [sum(lengths[i] for i in u) for u in self.units]
        self.world, self.accumulation, self.seed = world, accumulation, seed
        self.group = group_by_length and not packing
        self.step_size = per_device * world * accumulation  # units per optimizer step: all that decides a step
        self.steps_per_epoch = math.ceil(len(self.units) / self.step_size)
        self.micro_per_epoch = self.steps_per_epoch * accumulation

    @lru_cache(maxsize=2)  # noqa: B019 -- two epochs' orders, kept as long as the schedule itself
    def epoch(self, epoch: int) -> list[list[int]]:
        """The epoch's optimizer steps, as lists of unit indices."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.units), generator=g).tolist()
        size = self.step_size
        if not self.group:
            return [order[i:i + size] for i in range(0, len(order), size)]
        steps = []
        span = size * GROUP_SPAN
        for start in range(0, len(order), span):
            window = sorted(order[start:start + span], key=lambda u: -self.unit_len[u])
            steps += [window[i:i + size] for i in range(0, len(window), size)]
        perm = torch.randperm(len(steps), generator=g).tolist()
        return [steps[i] for i in perm]

    def examples(self, micro_index: int, rank: int) -> list[list[int]]:
        """This rank's rows for micro-batch `micro_index`: each row a list of example indices.
        A short last step is spread evenly over its micro-batches, and each micro-batch strided
        over ranks, so every rank gets similar lengths and as few empty micro-batches as can be."""
        epoch, j = divmod(micro_index, self.micro_per_epoch)
        step, i = divmod(j, self.accumulation)
        units = self.epoch(epoch)[step]
        n, acc = len(units), self.accumulation
        micro = units[i * n // acc:(i + 1) * n // acc]
        return [self.units[u] for u in micro[rank::self.world]]

    def epoch_of(self, micro_index: int) -> float:
        return micro_index / self.micro_per_epoch


def total_steps(schedule: Schedule, epochs: float, max_steps: int) -> int:
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(epochs * schedule.steps_per_epoch))


def collate(rows: list[list[dict]], pad_id: int, packed: bool, padding_free: bool = False,
            vision: Vision | None = None) -> MicroBatch:
    """Rows of examples -> a right-padded micro-batch.

    Padded: one example per row, with an attention mask. Packed: several examples per row with
    position_ids restarting at 0 at each example and NO attention mask, which is how transformers
    recognises the packed layout and keeps examples from attending to each other. The label at
    each example's first position is masked so no example learns to predict the next one's start.
    A row with `weight` 0 contributes tokens to the forward but nothing to the loss.
    `padding_free` (packed only) puts all rows in one row: no padding at all, for attention that
    takes varlen offsets (sftkit's varlen, flash-attention); eager/sdpa would build a mask
    quadratic in the whole micro-batch instead. A packed batch's offsets come along as
    transformers' FlashAttentionKwargs (`cu_seq_lens_q`, `max_length_q`, ...), counted over the
    rows laid end to end (a row's padding is a sequence of its own), so no layer derives them from
    position_ids (a host sync per layer), and Gated DeltaNet layers, which never see position_ids,
    get them too (sftkit/arch/packed_linear_attention.py); eager/sdpa attention ignores them.
    """
    if packed and padding_free:
        rows = [[e for row in rows for e in row]]
    seqs, labs, poss, segs, lengths = [], [], [], [], []
    for row in rows:
        ids, lab, pos, seg = [], [], [], []
        for e in row:
            ids += e["input_ids"]
            first = len(lab)
            lab += e["labels"] if e.get("weight", 1) else [IGNORE_INDEX] * len(e["labels"])
            lab[first] = IGNORE_INDEX
            pos += range(len(e["input_ids"]))
            seg += [len(lengths) if e.get("weight", 1) else -1] * len(e["input_ids"])
            lengths += [len(e["input_ids"])] if e.get("weight", 1) else []
        seqs.append(ids)
        labs.append(lab)
        poss.append(pos)
        segs.append(seg)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.arange(width).repeat(len(rows), 1)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (s, lab, pos, seg) in enumerate(zip(seqs, labs, poss, segs)):
        ids[i, :len(s)] = torch.as_tensor(s)
        segments[i, :len(s)] = torch.as_tensor(seg)
        labels[i, :len(s)] = torch.as_tensor(lab)
        positions[i, :len(s)] = torch.as_tensor(pos)
        positions[i, len(s):] = torch.arange(width - len(s))  # padding is a sequence of its own
        mask[i, :len(s)] = 1
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    inputs = {"input_ids": ids, "position_ids": positions} if packed else {"input_ids": ids, "attention_mask": mask}
    without = {}
    if vision is not None:
        inputs.update(image_inputs(rows, seqs, positions, vision))
        if "pixel_values" not in inputs:
            got = pixels([stand_in()], vision.processor)
            without = {"stand_in_pixels": got["pixel_values"].float(), "stand_in_grid": got["image_grid_thw"].long()}
    if packed:
        # each row's examples, then its padding as a sequence of its own, rows end to end
        cu, longest = offsets([n for row, s in zip(rows, seqs) for n in
                               [len(e["input_ids"]) for e in row] + [width - len(s)] * (len(s) < width)])
        inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    pairs = sum(len(e["input_ids"]) ** 2 for row in rows for e in row)
    return MicroBatch(inputs, keep, labels[:, 1:][keep[:, :-1]], int(mask.sum()), ids.numel(), pairs, segments,
                      torch.tensor(lengths, dtype=torch.long), **without)


def image_inputs(rows: list[list[dict]], seqs: list[list[int]], positions: torch.Tensor, vision: Vision) -> dict:
    """A vision-language model's inputs beyond the ids: position_ids (4, rows, width), the text
    positions then each example's own M-RoPE positions (sftkit/arch/vision.py), and where the rows
    hold images, their pixel_values and image_grid_thw, in the order their tokens come (row by row)."""
    paths = [path for row in rows for e in row for path in e.get("images") or ()]
    got = pixels([Path(p).read_bytes() for p in paths], vision.processor) if paths else None
    grids = [tuple(g) for g in got["image_grid_thw"].tolist()] if got else []
    mrope = positions[None].repeat(3, 1, 1)
    k = 0
    for i, row in enumerate(rows):
        at = 0
        for e in row:
            n, m = len(e["input_ids"]), len(e.get("images") or ())
            if m:
                ids = torch.as_tensor(seqs[i][at:at + n])
                want = sum(t * h * w // vision.merge_size ** 2 for t, h, w in grids[k:k + m])
                if int((ids == vision.image_token_id).sum()) != want:
                    raise ValueError(f"an example holds {int((ids == vision.image_token_id).sum())} image tokens "
                                     f"where the image processor makes {want}: its set was prepared with another "
                                     "image processor; prepare it again with this model")
                mrope[:, i, at:at + n] = mrope_positions(ids, grids[k:k + m], vision.image_token_id, vision.merge_size)
                k += m
            at += n
    out = {"position_ids": torch.cat([positions[None], mrope])}
    if got:
        out.update(pixel_values=got["pixel_values"].float(), image_grid_thw=got["image_grid_thw"].long())
    return out


def load_micro_batch(dataset, rows: list[list[int]], pad_id: int, packed: bool = False,
                     padding_free: bool = False, vision: Vision | None = None) -> MicroBatch:
    """Collate these rows of example indices; with none, one example with no supervised token keeps
    every rank in step (each rank must run forward and backward) while adding nothing to the loss."""
    if not rows:
        return collate([[{**dataset[0], "weight": 0}]], pad_id, packed, vision=vision)
    return collate([[dataset[i] for i in row] for row in rows], pad_id, packed, padding_free, vision)


def shard_sequence(batch: MicroBatch, size: int, index: int) -> MicroBatch:
    """Shard `index` of `size` of a padding-free packed micro-batch (one row), for sequence
    parallelism (sftkit/sequence_parallel.py): the row, padded to a multiple of `size` with a
    padding sequence of its own, cut into equal spans of tokens. Each shard keeps the whole row's
    offsets (its attention sees every token after the all-to-all) and the targets of its own
    logits; tokens, slots and attention pairs are split so that their sums over the shards are the
    row's."""
    if "pixel_values" in batch.inputs:
        raise ValueError("sequence parallelism does not split rows with images")
    ids, positions = batch.inputs["input_ids"], batch.inputs["position_ids"]
    if ids.shape[0] != 1:
        raise ValueError("sequence parallelism shards padding-free rows (packing with varlen attention)")
    width = ids.shape[1]
    extra = -width % size
    cu, longest = batch.inputs["cu_seq_lens_q"], batch.inputs["max_length_q"]
    keep, segments = batch.keep, batch.segments
    if extra:
        # any id will do: the padding is a sequence of its own and never a target
        ids = torch.cat([ids, torch.full((1, extra), int(ids[0, -1]), dtype=ids.dtype)], dim=1)
        positions = torch.cat([positions, torch.arange(extra, dtype=positions.dtype)[None]], dim=1)
        keep = torch.cat([keep, torch.zeros((1, extra), dtype=torch.bool)], dim=1)
        segments = torch.cat([segments, torch.full((1, extra), -1, dtype=segments.dtype)], dim=1)
        cu = torch.cat([cu, torch.tensor([width + extra], dtype=cu.dtype)])
        longest = max(longest, extra)
    span = (width + extra) // size
    start, end = index * span, (index + 1) * span
    before = int(keep[0, :start].sum())
    inputs = {**batch.inputs, "input_ids": ids[:, start:end], "position_ids": positions[:, start:end],
              "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    pairs = batch.attn_pairs // size + (batch.attn_pairs % size if index == 0 else 0)
    tokens = min(end, batch.tokens) - min(start, batch.tokens)  # the row's real tokens come first
    lengths = batch.lengths if index == 0 or batch.lengths is None else batch.lengths[:0]
    return MicroBatch(inputs, keep[:, start:end], batch.targets[before:before + int(keep[0, start:end].sum())],
                      tokens, span, pairs, segments[:, start:end], lengths)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn. SLURM's scancel, a container stop or Ctrl-C signal the whole
    process group: a worker killed by SIGTERM would make the training process raise mid-step
    instead of saving its checkpoint. Workers leave the decision to it and exit with it."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# A worker ignores SIGTERM (above) and may be stuck (a hung read, a stopped process): torch's own
# shutdown joins it for 5 s, sends the SIGTERM it ignores and joins 5 s more, and then the
# interpreter's exit would join it forever (the run says "stopped" and never ends).
KILL_WAIT_S = 5.0


def end_workers(iterator) -> None:
    """End a DataLoader iterator's worker processes once nothing they hold is needed (the
    checkpoint is saved): torch's shutdown first, which also stops watching them, so their deaths
    raise nothing here; then SIGKILL for any still alive."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is None:  # no worker processes (dataloader_num_workers 0)
        return
    shutdown()
    for worker in getattr(iterator, "_workers", []):
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=KILL_WAIT_S)


class StepBatches(torch.utils.data.Dataset):
    """Item k: this rank's micro-batches of optimizer step k, a pure function of k. A DataLoader's
    workers can then collate ahead of the training loop, and a resumed run starts at any step."""

    def __init__(self, dataset, schedule: Schedule, accumulation: int, rank: int, pad_id: int,
                 packed: bool, padding_free: bool = False, sequence: tuple[int, int] = (1, 0),
                 vision: Vision | None = None):
        self.dataset, self.schedule, self.accumulation, self.rank = dataset, schedule, accumulation, rank
        self.pad_id, self.packed, self.padding_free, self.vision = pad_id, packed, padding_free, vision
        self.sequence = sequence  # (processes sharing each row, this one's shard): sequence parallelism

    def __getitem__(self, step: int) -> list[MicroBatch]:
        first = step * self.accumulation
        batches = [load_micro_batch(self.dataset, self.schedule.examples(first + i, self.rank), self.pad_id,
                                    self.packed, self.padding_free, self.vision) for i in range(self.accumulation)]
        size, index = self.sequence
        return batches if size == 1 else [shard_sequence(b, size, index) for b in batches]


@dataclass
class PackedStep:
    """One step's micro-batches as ONE int64 tensor. A DataLoader worker hands every tensor to
    the training process through shared memory, one file descriptor each: 4 per micro-batch, so
    --gradient_accumulation_steps 200 with two steps prefetched would need 1,600, past a usual
    `ulimit -n` of 1024. Packed, a step needs one."""

    buffer: torch.Tensor
    layout: list[tuple]  # per micro-batch: ([(field, shape, dtype), ...], tokens, slots, attn_pairs, {field: int})

    def pin_memory(self) -> PackedStep:  # called by the DataLoader's pinning thread
        return PackedStep(self.buffer.pin_memory(), self.layout)

    def unpack(self) -> list[MicroBatch]:
        out, at = [], 0
        for fields, tokens, slots, pairs, numbers in self.layout:
            parts = {}
            for name, shape, dtype in fields:
                n = math.prod(shape)
                part = self.buffer[at:at + n]
                # float32 travels as its bits (see pack)
                parts[name] = part.int().view(torch.float32).view(shape) if dtype == torch.float32 else \
                    part.view(shape).to(dtype)
                at += n
            keep, targets = parts.pop("keep"), parts.pop("targets")
            extra = {k: parts.pop(k) for k in PER_EXAMPLE if k in parts}
            out.append(MicroBatch({**parts, **numbers}, keep, targets, tokens, slots, pairs, **extra))
        return out


def pack(batches: list[MicroBatch]) -> PackedStep:
    pieces, layout = [], []
    for b in batches:
        tensors = {**{k: v for k, v in b.inputs.items() if torch.is_tensor(v)}, "keep": b.keep, "targets": b.targets,
                   **{k: getattr(b, k) for k in PER_EXAMPLE if getattr(b, k) is not None}}
        numbers = {k: v for k, v in b.inputs.items() if not torch.is_tensor(v)}
        layout.append(([(k, tuple(t.shape), t.dtype) for k, t in tensors.items()], b.tokens, b.slots, b.attn_pairs,
                       numbers))
        pieces += [t.reshape(-1).view(torch.int32).long() if t.dtype == torch.float32 else t.reshape(-1).long()
                   for t in tensors.values()]
    return PackedStep(torch.cat(pieces), layout)


class PackedSteps(torch.utils.data.Dataset):
    """StepBatches, each item packed for the trip from a DataLoader worker (see PackedStep)."""

    def __init__(self, steps: StepBatches):
        self.steps = steps

    def __getitem__(self, step: int) -> PackedStep:
        return pack(self.steps[step])
