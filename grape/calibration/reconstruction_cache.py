"""The expert outputs behind the reconstruction order's incremental greedy
(grape.calibration.reconstruction_greedy): f_e(x) for the (row, expert) pairs a row's routing
can reach as experts are removed, computed by the experts module on demand, with their Gram
entries and their products with the row's full output, in float64."""

from __future__ import annotations

from itertools import pairwise

import torch

from grape.models.adapters.base import MoEAdapter

# new outputs of a row multiplied by its block at a time in _ExpertCache._products: a float64
# bmm of many small matrices costs about as much per matrix on 1 to 4 columns as on 1
_WIDTH = 4
# (row, expert) pairs per call of the experts module in _expert_rows
_PAIRS_PER_CALL = 4096
# float64 values of the rows' blocks copied at a time in _ExpertCache._products (8 MB: the
# block of a row stays in cache while its columns are multiplied)
_BLOCK_VALUES = 1 << 20


def _at(table: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Entries `key` (flat positions, any shape) of a contiguous table: index_select on its
    flat view, several times faster on a CPU than 2-d advanced indexing."""
    return table.view(-1).index_select(0, key.reshape(-1)).view(key.shape)


def _expert_rows(adapter: MoEAdapter, layer: int, hidden: torch.Tensor, rows: torch.Tensor,
                 experts: torch.Tensor) -> torch.Tensor:
    """f_{experts[i]}(hidden[rows[i]]) for each i, (n, H) in the model's dtype: the experts
    module itself (offload hooks fire), each row routed to its one expert at weight 1. One
    call per run of experts holding about _PAIRS_PER_CALL pairs: an expert's rows go to it
    together, so its outputs are those of one call with every pair, and a CPU computes them
    about a third faster than in one call (a call's intermediate values stay in cache)."""
    order = torch.argsort(experts, stable=True)
    bounds = [0]
    for end in torch.cumsum(torch.bincount(experts), 0).tolist():  # pairs up to each expert
        if end - bounds[-1] >= _PAIRS_PER_CALL:
            bounds.append(end)
    if bounds[-1] < rows.shape[0]:
        bounds.append(rows.shape[0])
    out = torch.empty((rows.shape[0], hidden.shape[1]), dtype=hidden.dtype, device=hidden.device)
    for start, stop in pairwise(bounds):
        at = order[start:stop]
        ones = torch.ones(at.shape[0], 1, dtype=hidden.dtype, device=hidden.device)
        out.index_copy_(0, at, adapter.experts(layer)(hidden.index_select(0, rows[at]), experts[at, None], ones))
    return out


class _ExpertCache:
    """Expert outputs f_e(x_t) for the (row, expert) pairs the greedy needs, in slots of each
    row (a row needs its chosen experts and the next of its ranking, not all E: E x T outputs
    would cost E/k forward passes of the layer), with the Gram entries <f_a, f_b> between a
    row's cached outputs and their products with the row's full output y_full (float64, as
    token_grams); the outputs in the model's dtype. The products of a call's new outputs are
    made when y_full is known (set_full), so the first call's wait for it."""

    def __init__(self, adapter: MoEAdapter, layer: int, hidden: torch.Tensor, capacity: int):
        rows, device = hidden.shape[0], hidden.device
        self.adapter, self.layer, self.hidden = adapter, layer, hidden
        self.slot = torch.full((rows, adapter.num_experts(layer)), -1, dtype=torch.long,
                               device=device)
        self.used = torch.zeros((rows, capacity), dtype=torch.bool, device=device)
        self.out = torch.zeros((rows, capacity, hidden.shape[1]), dtype=hidden.dtype, device=device)
        self.cross = torch.zeros((rows, capacity), dtype=torch.float64, device=device)
        self.gram = torch.zeros((rows, capacity, capacity), dtype=torch.float64, device=device)
        self.live = torch.zeros(rows, dtype=torch.long, device=device)  # outputs cached per row
        self.full: torch.Tensor | None = None  # y_full (T, H) float64, once set
        self.pending: list[tuple] = []  # (rows, slots, outputs) added before y_full
        self.computed = 0  # outputs computed, for the record

    def add(self, rows: torch.Tensor, experts: torch.Tensor) -> None:
        """Compute and store the pairs not cached yet (repeats are fine), with their products
        with the row's other outputs (one batched product per row: its outputs read once)."""
        key = torch.unique(rows * self.slot.shape[1] + experts)  # sorted: grouped by row
        rows, experts = key // self.slot.shape[1], key % self.slot.shape[1]
        new = _at(self.slot, key) < 0
        rows, experts = rows[new], experts[new]
        if rows.numel() == 0:
            return
        slots = self._allocate(rows)
        outputs = _expert_rows(self.adapter, self.layer, self.hidden, rows, experts)
        at = rows * self.used.shape[1] + slots  # flat (row, slot) positions
        self.out.view(-1, self.out.shape[2]).index_copy_(0, at, outputs)
        self.slot.view(-1).index_copy_(0, key[new], slots)
        self.used.view(-1).index_fill_(0, at, True)
        self.live.index_add_(0, rows, torch.ones_like(rows))
        self.computed += rows.numel()
        if self.full is None:
            self.pending.append((rows, slots, outputs))
        else:
            self._products(rows, slots, outputs)

    def _allocate(self, rows: torch.Tensor) -> torch.Tensor:
        """Free slots for new pairs of `rows` (sorted): the i-th new pair of a row takes its
        i-th free slot; the slots grow for every row when one runs out."""
        owners, counts = torch.unique_consecutive(rows, return_counts=True)
        short = int((counts - (~self.used[owners]).sum(1)).max())
        if short > 0:
            self._grow(max(short, self.used.shape[1] // 2))
        free = torch.sort(self.used[owners].to(torch.int8), dim=1, stable=True).indices  # free first
        starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        rank = torch.arange(rows.shape[0], device=rows.device) - starts
        owner = torch.repeat_interleave(torch.arange(owners.shape[0], device=rows.device), counts)
        return free[owner, rank]

    def _grow(self, extra: int) -> None:
        def more(t: torch.Tensor, dim: int) -> torch.Tensor:  # `extra` zero slots along dim
            shape = list(t.shape)
            shape[dim] = extra
            return torch.cat([t, t.new_zeros(shape)], dim)

        self.used, self.out, self.cross = more(self.used, 1), more(self.out, 1), more(self.cross, 1)
        self.gram = more(more(self.gram, 1), 2)

    def _products(self, rows: torch.Tensor, slots: torch.Tensor, outputs: torch.Tensor) -> None:
        """Gram entries of the new `outputs` (`rows` sorted) with every slot of their row
        (stale slots included: never read), and their products with y_full, a few hundred
        rows at a time (_BLOCK_VALUES)."""
        owners, counts = torch.unique_consecutive(rows, return_counts=True)
        ends = torch.cumsum(counts, 0)
        place = torch.arange(rows.shape[0], device=rows.device) - torch.repeat_interleave(ends - counts, counts)
        owner = torch.repeat_interleave(torch.arange(owners.shape[0], device=rows.device), counts)
        first = torch.cat([ends.new_zeros(1), ends]).tolist()  # each owner's first pair
        per = max(1, _BLOCK_VALUES // ((self.out.shape[1] + 1) * self.out.shape[2]))
        for start in range(0, owners.shape[0], per):
            stop = min(start + per, owners.shape[0])
            lo, hi = first[start], first[stop]
            products = self._block_products(owners[start:stop], counts[start:stop],
                                            owner[lo:hi] - start, place[lo:hi], outputs[lo:hi])
            self._store_products(rows[lo:hi], slots[lo:hi], products)

    def _block_products(self, owners: torch.Tensor, counts: torch.Tensor, owner: torch.Tensor,
                        place: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """(pairs, slots + 1) float64: each new output (the place-th of owners[owner]) times
        its row's slots and y_full. The rows go in decreasing number of new outputs, so the
        rows with a j-th one are a prefix, and the new outputs _WIDTH columns at a time."""
        capacity, size = self.out.shape[1], self.out.shape[2]
        order = torch.argsort(counts, descending=True, stable=True)
        at = torch.empty_like(order)
        at[order] = torch.arange(order.shape[0], device=order.device)
        chosen = owners[order]
        block = self.full.new_empty((owners.shape[0], capacity + 1, size))  # (R, slots + y_full, H)
        block[:, :capacity] = self.out.index_select(0, chosen)
        block[:, capacity] = self.full.index_select(0, chosen)
        more = torch.bincount(counts).flip(0).cumsum(0).flip(0)[1:].tolist()  # rows with a j-th
        b = at[owner]
        mine = block.new_empty((block.shape[0], len(more), size))  # unset columns are never read
        mine[b, place] = outputs.to(torch.float64)
        products = block.new_empty((block.shape[0], capacity + 1, len(more)))
        for j in range(0, len(more), _WIDTH):
            m = more[j]
            products[:m, :, j:j + _WIDTH] = torch.bmm(block[:m], mine[:m, j:j + _WIDTH].transpose(1, 2))
        return products[b, :, place]

    def _store_products(self, rows: torch.Tensor, slots: torch.Tensor, products: torch.Tensor) -> None:
        """Write the Gram rows and columns of the new (row, slot) pairs and their products with
        y_full (flat positions: index_copy_ rather than 3-d advanced indexing)."""
        capacity = self.out.shape[1]
        at = rows * capacity + slots
        gram = products[:, :capacity]
        self.gram.view(-1, capacity).index_copy_(0, at, gram)  # the rows, then the columns
        column = (rows * capacity * capacity)[:, None] + torch.arange(capacity, device=rows.device) * capacity
        self.gram.view(-1).index_copy_(0, (column + slots[:, None]).view(-1), gram.reshape(-1))
        self.cross.view(-1).index_copy_(0, at, products[:, capacity])

    def set_full(self, full: torch.Tensor) -> None:
        """y_full (float64), and the products of the outputs cached so far."""
        self.full = full
        for rows, slots, outputs in self.pending:
            self._products(rows, slots, outputs)
        self.pending = []

    def free(self, expert: int) -> None:
        """Forget a removed expert's outputs (slot -1: a cached output is a remaining expert's)."""
        rows = torch.nonzero(self.slot[:, expert] >= 0).squeeze(1)
        self.used[rows, self.slot[rows, expert]] = False
        self.slot[rows, expert] = -1
        self.live.index_add_(0, rows, torch.full_like(rows, -1))

    def window(self, rows: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(<y_full, f_i>, <f_i, f_j>) for the cached experts `index` (n, m) of each row, float64:
        (n, m) and (n, m, m); stale values for uncached (removed) experts."""
        return self.window_at(rows, _at(self.slot, rows[:, None] * self.slot.shape[1] + index).clamp_min(0))

    def window_at(self, rows: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """window() of the experts in `slots` (n, m) of each row."""
        size = self.gram.shape[1]
        # flat (row, slot) positions: the Gram rows of the window's slots are whole rows of
        # the (rows * slots, slots) view (one index_select), then their window columns
        at = rows[:, None] * size + slots
        block = self.gram.view(-1, size).index_select(0, at.view(-1)).view(*at.shape, size)
        return _at(self.cross, at), block.gather(2, slots[:, None, :].expand(-1, at.shape[1], -1))

    def products(self, rows: torch.Tensor, index: torch.Tensor, weight: torch.Tensor):
        """(<y_full, y>, ||y||^2) per row for y = sum_i weight[:, i] f_{index[:, i]}, float64."""
        weight = weight.to(torch.float64)
        if bool(((_at(self.slot, rows[:, None] * self.slot.shape[1] + index) < 0) & (weight != 0)).any()):
            raise RuntimeError("reconstruction order: an expert output was not computed")
        cross, block = self.window(rows, index)  # a removed expert is only chosen at weight 0
        return (weight * cross).sum(1), torch.einsum("ni,nij,nj->n", weight, block, weight)
