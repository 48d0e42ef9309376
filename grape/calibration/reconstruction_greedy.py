"""The incremental greedy behind grape.calibration.reconstruction.reconstruction_order: a removal re-evaluates
only the rows whose routing it can change (the adapter's RemovalEffect), from the experts'
outputs on the (token, expert) pairs routing can reach, cached per row; the trial with the
smallest layer output error is removed, ties by index (see _pick)."""

from __future__ import annotations

import numpy as np
import torch

from grape.models.adapters.base import MoEAdapter

from grape.calibration.layer_outputs import _MAX_ROWS_PER_CALL, token_grams

# Trial errors within _TIE * sqrt(error * energy) (+ _TIE_FLOOR * energy, for errors that are
# rounding noise about 0) of the smallest are a tie, won by the lower expert index. The errors
# carry the float32 rounding of the router's weights and of the experts' outputs (about 1e-7
# relative to the output, so about 1e-7 * sqrt(error * energy) on the error; exactly tied
# experts, such as duplicates, differ by that much), which must not decide the order.
_TIE = 1e-6
_TIE_FLOOR = 1e-12
# router scores closer than _NEAR * (1 + the row's largest |score|) may come out of the
# router's float32 softmax in either order (its rounding is about 5e-7 of that), and
# torch.topk breaks exact ties depending on the other values of the row
_NEAR = 1e-6
# each row's cached expert outputs beyond its chosen experts: topped up to _AHEAD when fewer
# than _AHEAD // 2 remain, so the experts module is called a few dozen times per layer
_AHEAD = 8


def _pick(values: torch.Tensor, energy: float, allowed: torch.Tensor) -> int:
    """The expert to remove: the smallest trial error among `allowed` (E,) bool, ties (see
    _TIE) to the lower index; a NaN error counts as +inf, and if every one is, the lowest
    allowed index goes."""
    values = torch.nan_to_num(values, nan=float("inf")).masked_fill(~allowed, float("inf"))
    best = float(values.min())
    tol = _TIE * max(best, 0.0) ** 0.5 * max(energy, 0.0) ** 0.5 + _TIE_FLOOR * max(energy, 0.0)
    return int(torch.nonzero(allowed & (values <= best + tol))[0, 0])


def _expert_rows(adapter: MoEAdapter, layer: int, hidden: torch.Tensor, rows: torch.Tensor,
                 experts: torch.Tensor) -> torch.Tensor:
    """f_{experts[i]}(hidden[rows[i]]) for each i, (n, H) in the model's dtype: the experts
    module itself (offload hooks fire), each row routed to its one expert at weight 1."""
    out = []
    for start in range(0, rows.shape[0], _MAX_ROWS_PER_CALL):
        r, e = rows[start:start + _MAX_ROWS_PER_CALL], experts[start:start + _MAX_ROWS_PER_CALL]
        ones = torch.ones(r.shape[0], 1, dtype=hidden.dtype, device=hidden.device)
        out.append(adapter.experts(layer)(hidden[r], e[:, None], ones))
    return torch.cat(out)


class _ExpertCache:
    """Expert outputs f_e(x_t) for the (row, expert) pairs the greedy needs, in slots of each
    row (a row needs its chosen experts and the next of its ranking, not all E: E x T outputs
    would cost E/k forward passes of the layer), with the Gram entries <f_a, f_b> between a
    row's cached outputs and their products with the row's full output y_full (float64, as
    token_grams); the outputs in the model's dtype (a row's block is read once per call)."""

    def __init__(self, adapter: MoEAdapter, layer: int, hidden: torch.Tensor, capacity: int):
        rows, device = hidden.shape[0], hidden.device
        self.adapter, self.layer, self.hidden = adapter, layer, hidden
        self.slot = torch.full((rows, adapter.num_experts(layer)), -1, dtype=torch.long,
                               device=device)
        self.used = torch.zeros((rows, capacity), dtype=torch.bool, device=device)
        self.out = torch.zeros((rows, capacity, hidden.shape[1]), dtype=hidden.dtype, device=device)
        self.cross = torch.zeros((rows, capacity), dtype=torch.float64, device=device)
        self.gram = torch.zeros((rows, capacity, capacity), dtype=torch.float64, device=device)
        self.full: torch.Tensor | None = None  # y_full (T, H) float64, once set
        self.computed = 0  # outputs computed, for the record

    def add(self, rows: torch.Tensor, experts: torch.Tensor) -> None:
        """Compute and store the pairs not cached yet (repeats are fine), with their products
        with the row's other outputs (one batched product per row: its outputs read once)."""
        key = torch.unique(rows * self.slot.shape[1] + experts)  # sorted: grouped by row
        rows, experts = key // self.slot.shape[1], key % self.slot.shape[1]
        new = self.slot[rows, experts] < 0
        rows, experts = rows[new], experts[new]
        if rows.numel() == 0:
            return
        slots = self._allocate(rows)
        self.out[rows, slots] = _expert_rows(self.adapter, self.layer, self.hidden, rows, experts)
        self.slot[rows, experts] = slots
        self.used[rows, slots] = True
        self.computed += rows.numel()
        self._products(rows, slots)

    def _allocate(self, rows: torch.Tensor) -> torch.Tensor:
        """Free slots for new pairs of `rows` (sorted): the i-th new pair of a row takes its
        i-th free slot; the slots grow for every row when one runs out."""
        owners, counts = torch.unique_consecutive(rows, return_counts=True)
        short = int((counts - (~self.used[owners]).sum(1)).max())
        if short > 0:
            self._grow(max(short, self.used.shape[1] // 2))
        free = torch.sort(self.used[rows].to(torch.int8), dim=1, stable=True).indices
        starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        rank = torch.arange(rows.shape[0], device=rows.device) - starts
        return free[torch.arange(rows.shape[0], device=rows.device), rank]

    def _grow(self, extra: int) -> None:
        def more(t: torch.Tensor, dim: int) -> torch.Tensor:  # `extra` zero slots along dim
            shape = list(t.shape)
            shape[dim] = extra
            return torch.cat([t, t.new_zeros(shape)], dim)

        self.used, self.out, self.cross = more(self.used, 1), more(self.out, 1), more(self.cross, 1)
        self.gram = more(more(self.gram, 1), 2)

    def _products(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Gram entries of the new outputs (`rows` sorted) with every slot of their row
        (stale slots included: never read), and their products with y_full; ~32 MB of
        float64 at a time."""
        owners, counts = torch.unique_consecutive(rows, return_counts=True)
        place = torch.arange(rows.shape[0], device=rows.device) - \
            torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        owner = torch.repeat_interleave(torch.arange(owners.shape[0], device=rows.device), counts)
        new = torch.zeros((owners.shape[0], int(counts.max())), dtype=torch.long, device=rows.device)
        new[owner, place] = slots
        per = max(1, (1 << 22) // (self.out.shape[1] * self.out.shape[2]))
        for start in range(0, owners.shape[0], per):
            block = self.out[owners[start:start + per]].to(torch.float64)  # (R, slots, H)
            mine = block.gather(1, new[start:start + per, :, None].expand(-1, -1, block.shape[2]))
            products = torch.bmm(block, mine.transpose(1, 2))  # (R, slots, new)
            at = (owner >= start) & (owner < start + per)
            o, i = owner[at] - start, place[at]
            r, s = owners[o + start], new[o + start, i]
            self.gram[r, s, :] = products[o, :, i]
            self.gram[r, :, s] = products[o, :, i]
            if self.full is not None:
                self.cross[r, s] = (mine[o, i] * self.full[r]).sum(1)

    def set_full(self, full: torch.Tensor) -> None:
        """y_full, and its products with every output cached so far."""
        self.full = full
        per = max(1, (1 << 22) // (self.out.shape[1] * self.out.shape[2]))
        for start in range(0, full.shape[0], per):
            part = self.out[start:start + per].to(torch.float64)
            products = torch.bmm(part, full[start:start + per, :, None])
            self.cross[start:start + per] = products.squeeze(2)

    def free(self, expert: int) -> None:
        rows = torch.nonzero(self.slot[:, expert] >= 0).squeeze(1)
        self.used[rows, self.slot[rows, expert]] = False
        self.slot[rows, expert] = -1

    def window(self, rows: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(<y_full, f_i>, <f_i, f_j>) for the cached experts `index` (n, m) of each row, float64:
        (n, m) and (n, m, m); stale values for uncached (removed) experts."""
        slots = self.slot[rows[:, None], index].clamp_min(0)
        size = self.gram.shape[1]  # flat positions: one take instead of 3-d indexing
        at = ((rows * size)[:, None, None] + slots[:, :, None]) * size + slots[:, None, :]
        return self.cross.view(-1)[rows[:, None] * size + slots], self.gram.view(-1)[at]

    def products(self, rows: torch.Tensor, index: torch.Tensor, weight: torch.Tensor):
        """(<y_full, y>, ||y||^2) per row for y = sum_i weight[:, i] f_{index[:, i]}, float64."""
        weight = weight.to(torch.float64)
        if bool(((self.slot[rows[:, None], index] < 0) & (weight != 0)).any()):
            raise RuntimeError("reconstruction order: an expert output was not computed")
        cross, block = self.window(rows, index)  # a removed expert is only chosen at weight 0
        return (weight * cross).sum(1), torch.einsum("ni,nij,nj->n", weight, block, weight)


def _near(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Router scores the router may order either way: within _NEAR * scale, or both -inf."""
    close = (a - b).abs() <= _NEAR * scale
    return (torch.isfinite(a) & torch.isfinite(b) & close) | (torch.isneginf(a) & torch.isneginf(b))


class _Greedy:
    """reconstruction_order, incrementally. Per row it keeps the routing with the experts
    removed so far masked and, for each expert whose removal can re-route the row
    (`affected`: its chosen experts, the best of each routing group, every expert when the
    router's choice is a near-tie), the row's error with that expert removed too. A trial's
    error sums the affected rows' stored errors and the other rows' current ones (rescaled
    per row for a softmax router). A removal changes only the rows whose routings or
    near-ties involve the removed expert (`depends`); those are evaluated again, so a step
    costs O(rows it changed x k).

    Routings come from the router itself (`route_rows`: the same operations on the same
    values as `route_masked`) for near-ties and group-limited routers; otherwise from the
    ranking and RemovalEffect.strength (the chosen are the k best remaining, a removed chosen
    expert gives way to the next one), which is exact away from near-ties."""

    def __init__(self, adapter: MoEAdapter, layer: int, hidden: torch.Tensor, effect,
                 logits: torch.Tensor, full_index: torch.Tensor, full_weight: torch.Tensor):
        rows, experts = logits.shape
        device = hidden.device
        self.adapter, self.layer, self.effect, self.logits = adapter, layer, effect, logits
        self.k = int(full_index.shape[1])
        self.removed = torch.zeros(experts, dtype=torch.bool, device=device)
        self.rank = (effect.choice(logits) if effect.choice else logits).to(torch.float64)
        self.ranking = torch.argsort(self.rank, dim=1, descending=True, stable=True)
        self.scale = 1 + self.rank.abs().amax(1)  # of a near-tie (_near)
        self.cache = _ExpertCache(adapter, layer, hidden, capacity=self.k + _AHEAD + 4)
        every = torch.arange(rows, device=device)
        self._fetch(every, full_index)
        full = self._outputs(full_index, full_weight)
        self.cache.set_full(full)
        self.energy_rows = (full * full).sum(1)
        self.energy = float(self.energy_rows.mean())
        del full
        self._formula_setup(full_index, full_weight)
        dense = lambda dtype: torch.zeros((rows, experts), dtype=dtype, device=device)  # noqa: E731
        self.affected, self.depends = dense(torch.bool), dense(torch.bool)
        if effect.rescale:  # per row and trial: <y_full, y>, ||y||^2 and the softmax mass of y
            self.current = torch.zeros((3, rows), dtype=torch.float64, device=device)
            self.trial = torch.zeros((3, rows, experts), dtype=torch.float64, device=device)
        else:  # the row's error now, and how much each affected trial adds to it
            self.error = torch.zeros(rows, dtype=torch.float64, device=device)
            self.delta = dense(torch.float64)
        self.refresh(every)

    def _formula_setup(self, full_index: torch.Tensor, full_weight: torch.Tensor) -> None:
        """Per row, what turns strengths into weights (RemovalEffect): the chosen weights'
        sum (renormalised routers) or the weight per unit of strength; and a softmax
        router's mass (exp of the logits less the row's largest), its weights' normaliser."""
        effect, logits = self.effect, self.logits.to(torch.float64)
        if effect.rescale:
            self.mass = torch.exp(logits - logits.amax(1, keepdim=True))
        self.strength = None
        if effect.strength is None or effect.groups > 1:  # the router decides every routing
            return
        self.strength = effect.strength(self.logits).to(torch.float64)
        weight = full_weight.to(torch.float64)
        if effect.renormalise:
            self.unit = weight.sum(1)
        else:
            top = weight.argmax(1, keepdim=True)
            strength = self.strength.gather(1, full_index.gather(1, top))
            self.unit = (weight.gather(1, top) / strength).squeeze(1)

    def _outputs(self, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """sum_i weight[:, i] f_{index[:, i]}(x) per row (all rows), float64, from the cache."""
        out = []
        for start in range(0, index.shape[0], 256):
            rows = torch.arange(start, min(start + 256, index.shape[0]), device=index.device)
            slots = self.cache.slot[rows[:, None], index[rows]]
            f = self.cache.out[rows[:, None], slots].to(torch.float64)
            out.append((weight[rows].to(torch.float64)[:, :, None] * f).sum(1))
        return torch.cat(out)

    def _route(self, rows: torch.Tensor, removed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per = max(1, (1 << 22) // self.logits.shape[1])  # bounds the router's temporaries
        parts = [self.adapter.route_rows(self.layer, self.logits[rows[s:s + per]], removed[s:s + per])
                 for s in range(0, max(rows.shape[0], 1), per)]  # no rows: an empty routing
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _fetch(self, rows: torch.Tensor, index: torch.Tensor) -> None:
        """Cache the outputs a routing needs; when some are missing, also the next of each
        row's ranking for rows with fewer than _AHEAD // 2 left beyond their chosen ones."""
        owners = rows[:, None].expand_as(index).reshape(-1)
        experts = index.reshape(-1)
        missing = ~self.removed[experts] & (self.cache.slot[owners, experts] < 0)
        if not bool(missing.any()):
            return
        cached = (self.cache.slot >= 0) & ~self.removed
        ahead = cached.sum(1) - min(self.k, int((~self.removed).sum()))
        short = torch.nonzero(ahead < _AHEAD // 2).squeeze(1)
        ranking = self.ranking[short]
        fresh = ~self.removed[ranking] & ~cached[short].gather(1, ranking)
        take = fresh & (fresh.cumsum(1) <= (_AHEAD - ahead[short])[:, None])
        pick, at = torch.nonzero(take, as_tuple=True)
        self.cache.add(torch.cat([owners[missing], short[pick]]),
                       torch.cat([experts[missing], ranking[pick, at]]))

    def refresh(self, rows: torch.Tensor) -> None:
        """Evaluate `rows` again: their routing with the experts removed so far and each
        affected trial's, by formula where the router allows it and the row's choice is no
        near-tie, else by the router."""
        if self.strength is None:
            self._store(rows, *self._by_router(rows))
            return
        value = self.rank[rows].masked_fill(self.removed, float("-inf"))
        top = value.topk(min(self.k + 2, value.shape[1]), dim=1)
        fragile = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        for i in (self.k - 1, self.k):  # the k-th choice, and the next after one is removed
            if i + 1 < top.values.shape[1]:  # (removed experts tie at -inf, chosen at weight 0)
                fragile |= _near(top.values[:, i], top.values[:, i + 1], self.scale[rows]) & \
                    torch.isfinite(top.values[:, i + 1])
        if bool(fragile.any()):
            self._store(rows[fragile], *self._by_router(rows[fragile]))
        if not bool(fragile.all()):
            self._store(rows[~fragile], *self._by_formula(rows[~fragile], top.indices[~fragile]))

    def _store(self, rows: torch.Tensor, affected: torch.Tensor, watched: torch.Tensor, now: tuple,
               trials: tuple) -> None:
        """Keep what values() needs: `now` (cross, square, mass) per row, `trials` (row
        position, expert, cross, square, mass) per affected trial."""
        self.affected[rows], self.depends[rows] = affected, watched
        (now_cross, now_square, now_mass), (pair, expert, cross, square, mass) = now, trials
        owner = rows[pair]
        energy = self.energy_rows
        if self.effect.rescale:
            self.current[:, rows] = torch.stack([now_cross, now_square, now_mass])
            self.trial[:, owner, expert] = torch.stack([cross, square, mass])
        else:
            self.error[rows] = (energy[rows] - 2 * now_cross + now_square).clamp_min(0)
            self.delta[rows] = 0
            error = (energy[owner] - 2 * cross + square).clamp_min(0)
            self.delta[owner, expert] = error - self.error[owner]

    def _by_router(self, rows: torch.Tensor):
        """Route `rows`, and each of their affected trials, with the router itself."""
        index, weight = self._route(rows, self.removed.expand(rows.shape[0], -1))
        self._fetch(rows, index)
        affected, watched = self._scope(rows, index)
        watched.scatter_(1, index, True)
        now_cross, now_square = self.cache.products(rows, index, weight)
        pair, expert = torch.nonzero(affected, as_tuple=True)
        owner = rows[pair]
        masks = self.removed.expand(pair.shape[0], -1).clone()
        masks[torch.arange(pair.shape[0], device=masks.device), expert] = True
        trial_index, trial_weight = self._route(owner, masks)
        self._fetch(owner, trial_index)
        cross, square = self.cache.products(owner, trial_index, trial_weight)
        watched[pair[:, None].expand_as(trial_index), trial_index] = True
        now_mass = mass = None
        if self.effect.rescale:  # the router's weights are at the remaining experts' mass
            now_mass, mass = self._mass(rows), self._mass(owner) - self.mass[owner, expert]
        now = (now_cross, now_square, now_mass)
        return affected, watched, now, (pair, expert, cross, square, mass)

    def _by_formula(self, rows: torch.Tensor, top: torch.Tensor):
        """`rows` (no near-tie, no groups) chose top[:, :k]; removing chosen expert i brings
        in top[:, k], and the weights follow from the strengths (RemovalEffect). With v the
        weights over those k + 1 experts f and y = sum v f, trial i routes to
        a_i (y - v_i f_i) (a_i renormalises), so every trial's products with y_full and its
        own come in closed form from <y_full, f>, <y, f> = G v and ||f||^2 = diag G.
        A softmax router's weights are kept as at no removal (mass: every expert's);
        values() rescales them."""
        n, k = rows.shape[0], self.k
        window = top[:, :k + 1]
        self._fetch(rows, window)
        cross, block = self.cache.window(rows, window)
        v = self.strength[rows[:, None], window] * ~self.removed[window]  # fewer than k + 1 left
        unit = self.unit[rows][:, None]
        v = v * (unit / v[:, :k].sum(1, keepdim=True) if self.effect.renormalise else unit)
        fy = torch.bmm(block, v[:, :, None]).squeeze(2)  # <f_i, y>
        norm = block.diagonal(dim1=1, dim2=2)
        yy, cy = (v * fy).sum(1), (v * cross).sum(1)
        new = v[:, k]  # the entrant is not chosen now
        now_cross = cy - new * cross[:, k]
        now_square = yy - 2 * new * fy[:, k] + new ** 2 * norm[:, k]
        out = v[:, :k]  # trial i: without chosen i, renormalised over the rest
        scale = unit / (v.sum(1, keepdim=True) - out) if self.effect.renormalise else \
            torch.ones_like(out)
        trial_cross = scale * (cy[:, None] - out * cross[:, :k])
        trial_square = scale ** 2 * (yy[:, None] - 2 * out * fy[:, :k] + out ** 2 * norm[:, :k])
        affected = torch.zeros((n, self.rank.shape[1]), dtype=torch.bool, device=rows.device)
        affected.scatter_(1, top[:, :k], True)
        watched = affected.clone().scatter_(1, top, True)
        affected &= ~self.removed
        pair, slot = torch.nonzero(~self.removed[top[:, :k]], as_tuple=True)
        now_mass = mass = None
        if self.effect.rescale:
            now_mass = self.mass[rows].sum(1)
            mass = now_mass[pair]
        return affected, watched, (now_cross, now_square, now_mass), \
            (pair, top[pair, slot], trial_cross[pair, slot], trial_square[pair, slot], mass)

    def _scope(self, rows: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(affected, watched) (n, E) bool for `rows` routed to `index` by the router: the
        experts whose removal can re-route the row (every one if the choice is a near-tie),
        and the further ones whose removal changes that answer (the next choices, a group's
        next best)."""
        n, experts = index.shape[0], self.rank.shape[1]
        value = self.rank[rows].masked_fill(self.removed, float("-inf"))
        affected = torch.zeros((n, experts), dtype=torch.bool, device=index.device)
        affected.scatter_(1, index, True)
        watched = torch.zeros_like(affected)
        if self.effect.groups > 1:
            fragile = self._groups(value, affected, watched, self.scale[rows])
        else:
            top = value.topk(min(self.k + 2, experts), dim=1)
            watched.scatter_(1, top.indices, True)
            fragile = torch.zeros(n, dtype=torch.bool, device=index.device)
            for i in (self.k - 1, self.k):
                if i + 1 < top.values.shape[1]:
                    fragile |= _near(top.values[:, i], top.values[:, i + 1], self.scale[rows])
        affected[fragile] = True  # a near-tie may resolve otherwise after any removal
        return affected & ~self.removed, watched | affected

    def _groups(self, value: torch.Tensor, affected: torch.Tensor, watched: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
        """Group-limited routing (RemovalEffect.groups): marks as affected the best `group_top`
        of each eligible group (ties included: their removal lowers its score), as watched the
        next one and those of the best other group (a trial can swap it in), and returns the
        rows whose choice is fragile: near-tied group scores at the cut, near-ties among the
        best k + 2 of those groups, or too few experts left in them."""
        n, experts = value.shape
        groups, size, chosen_groups = self.effect.groups, experts // self.effect.groups, self.effect.topk_group
        by_group = value.view(n, groups, size)
        top = min(self.effect.group_top, size)
        best = by_group.topk(min(top + 1, size), dim=2)
        score = best.values[:, :, :top].sum(2)
        ranked = score.topk(min(chosen_groups + 1, groups), dim=1)
        eligible = torch.zeros((n, groups), dtype=torch.bool, device=value.device)
        eligible.scatter_(1, ranked.indices[:, :chosen_groups], True)
        cut = best.values[:, :, top - 1:top]
        members = torch.isfinite(by_group) & (by_group >= cut) & eligible[:, :, None]
        affected.view(n, groups, size).logical_or_(members)
        candidates = ranked.indices  # the eligible groups and the best other one
        offset = (torch.arange(groups, device=value.device) * size)[None, :, None]
        watched.scatter_(1, (best.indices + offset).gather(
            1, candidates[:, :, None].expand(-1, -1, best.indices.shape[2])).reshape(n, -1), True)
        lead = by_group.topk(min(self.k + 2, size), dim=2)
        values = lead.values.gather(1, candidates[:, :, None].expand(-1, -1, lead.values.shape[2]))
        chosen = (lead.indices + offset).gather(1, candidates[:, :, None].expand_as(values))
        watched.scatter_(1, chosen.reshape(n, -1), True)
        ordered = values.reshape(n, -1).sort(dim=1, descending=True).values
        finite = torch.isfinite(values).sum(2).sort(dim=1).values
        few = finite[:, :chosen_groups].sum(1) < self.k + 2
        near = _near(ordered[:, :-1], ordered[:, 1:], scale[:, None]) & torch.isfinite(ordered[:, 1:])
        fragile = few | near.any(1)
        if ranked.values.shape[1] > chosen_groups:  # the group cut itself
            fragile |= _near(ranked.values[:, chosen_groups - 1], ranked.values[:, chosen_groups], scale)
        return fragile

    def _mass(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax normaliser of each row over the remaining experts (up to the row's max)."""
        mass = self.mass if rows is None else self.mass[rows]
        return (mass * ~self.removed).sum(1)

    def values(self) -> torch.Tensor:
        """Every remaining expert's trial error: mean over rows of the row's error with it
        removed too; +inf for the removed."""
        rows = self.energy_rows.shape[0]
        if not self.effect.rescale:
            value = (self.error.sum() + self.delta.sum(0)) / rows
        else:  # y scales by the ratio of the softmax masses: ||y_full - c y||^2 per row
            left = self._mass()[:, None] - self.mass
            energy = self.energy_rows[:, None]
            scale = self.current[2][:, None] / left
            now_cross, now_square = self.current[0][:, None], self.current[1][:, None]
            kept = energy - 2 * scale * now_cross + scale ** 2 * now_square
            scale = self.trial[2] / left
            moved = energy - 2 * scale * self.trial[0] + scale ** 2 * self.trial[1]
            value = torch.where(self.affected, moved, kept).clamp_min(0).sum(0) / rows
        return value.masked_fill(self.removed, float("inf"))

    def run(self) -> tuple[np.ndarray, np.ndarray]:
        experts = self.removed.shape[0]
        order, errors = [], []
        for step in range(experts - 1):
            values = self.values()
            best = _pick(values, self.energy, ~self.removed)
            order.append(best)
            errors.append(float(values[best]))
            self.removed[best] = True
            self.cache.free(best)
            rows = torch.nonzero(self.depends[:, best]).squeeze(1)
            if rows.numel() and step < experts - 2:
                self.refresh(rows)
        order.append(int(torch.nonzero(~self.removed)[0, 0]))
        errors.append(self.energy)  # nothing left
        return np.array(order, dtype=np.int64), np.nan_to_num(np.array(errors, dtype=np.float64))
