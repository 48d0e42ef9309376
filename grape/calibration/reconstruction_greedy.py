"""The incremental greedy behind grape.calibration.reconstruction.reconstruction_order: a removal re-evaluates
only the rows whose routing it can change (the adapter's RemovalEffect), from the experts'
outputs on the (token, expert) pairs routing can reach, cached per row
(grape.calibration.reconstruction_cache); the trial with the smallest layer output error is
removed, ties by index (see _pick)."""

from __future__ import annotations

import numpy as np
import torch

from grape.calibration.reconstruction_cache import _at, _ExpertCache
from grape.models.adapters.base import MoEAdapter

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


def _subset(top, keep: torch.Tensor):
    """The rows `keep` of a topk result."""
    return torch.return_types.topk((top.values[keep], top.indices[keep]))


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
    costs O(rows it changed x k): the sums over rows are updated by the rows that changed,
    and a row's k + 2 best left come from its previous ones (_top).

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
        self.alive = experts  # experts not removed
        self._ranking_setup()
        self.cache = _ExpertCache(adapter, layer, hidden, capacity=self.k + _AHEAD + 1)
        every = torch.arange(rows, device=device)
        self._fetch(every, full_index)
        full = self._outputs(full_index, full_weight)
        self.cache.set_full(full)
        self.energy_rows = (full * full).sum(1)
        self.energy = float(self.energy_rows.mean())
        del full
        self._formula_setup(full_index, full_weight)
        self._state_setup()
        self.refresh(every)

    def _state_setup(self) -> None:
        """What values() reads, per row and trial; a refresh rewrites its rows' part."""
        (rows, experts), device, k = self.rank.shape, self.removed.device, self.k
        dense = lambda dtype: torch.zeros((rows, experts), dtype=dtype, device=device)
        self.affected, self.depends = dense(torch.bool), dense(torch.bool)
        self.formula = torch.zeros(rows, dtype=torch.bool, device=device)  # last stored by _by_formula
        if self.effect.rescale:  # per row and trial: <y_full, y>, ||y||^2 and the softmax mass of y
            self.current = torch.zeros((3, rows), dtype=torch.float64, device=device)
            self.trial = torch.zeros((3, rows, experts), dtype=torch.float64, device=device)
            return
        # the row's error now, and how much each affected trial adds to it; their sums over
        # rows kept up to date by _keep (values() reads them every step, a step changes a few
        # hundred rows); where a row's delta entries are: its `marked` experts (-1: none)
        # when the formula stored it, anywhere when the router did (`spread`), so that a
        # refresh clears k entries of the row rather than E
        self.error, self.delta = torch.zeros(rows, dtype=torch.float64, device=device), dense(torch.float64)
        self.error_sum = self.delta_sum = None  # on a GPU index_add_ adds in any order: dense sums
        if device.type == "cpu":
            self.error_sum = torch.zeros((), dtype=torch.float64, device=device)
            self.delta_sum = torch.zeros(experts, dtype=torch.float64, device=device)
        self.marked = torch.full((rows, k), -1, dtype=torch.long, device=device)
        self.spread = torch.ones(rows, dtype=torch.bool, device=device)

    def _ranking_setup(self) -> None:
        """The routers' scores per row (`rank`; `value`: the removed at -inf), each row's
        experts best first (`ranking`) and each expert's place in it (`where`), whether a
        row's scores are distinct and finite (then topk orders its best as `ranking` does),
        and the scale of a near-tie (_near)."""
        logits, rows, experts = self.logits, self.logits.shape[0], self.logits.shape[1]
        self.rank = (self.effect.choice(logits) if self.effect.choice else logits).to(torch.float64)
        self.ranking = torch.argsort(self.rank, dim=1, descending=True, stable=True)
        self.value = self.rank.clone()
        self.where = torch.empty_like(self.ranking).scatter_(
            1, self.ranking, torch.arange(experts, device=self.ranking.device).expand(rows, -1))
        ordered = self.rank.gather(1, self.ranking)
        self.distinct = torch.isfinite(ordered).all(1) & (ordered[:, 1:] != ordered[:, :-1]).all(1)
        self.top: torch.Tensor | None = None  # each row's k + 2 best left when last refreshed
        self.scale = 1 + self.rank.abs().amax(1)

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
        out, experts, capacity = [], self.cache.slot.shape[1], self.cache.out.shape[1]
        for start in range(0, index.shape[0], 256):
            rows = torch.arange(start, min(start + 256, index.shape[0]), device=index.device)
            slots = _at(self.cache.slot, rows[:, None] * experts + index[start:start + 256])
            at = (rows[:, None] * capacity + slots).view(-1)
            f = self.cache.out.view(-1, self.cache.out.shape[2]).index_select(0, at).view(*slots.shape, -1)
            out.append((weight[start:start + 256].to(torch.float64)[:, :, None] * f.to(torch.float64)).sum(1))
        return torch.cat(out)

    def _route(self, rows: torch.Tensor, removed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per = max(1, (1 << 22) // self.logits.shape[1])  # bounds the router's temporaries
        parts = [self.adapter.route_rows(self.layer, self.logits[rows[s:s + per]], removed[s:s + per])
                 for s in range(0, max(rows.shape[0], 1), per)]  # no rows: an empty routing
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _fetch(self, rows: torch.Tensor, index: torch.Tensor) -> None:
        """Cache the outputs a routing needs (see _fetch_missing)."""
        slots = _at(self.cache.slot, rows[:, None] * self.cache.slot.shape[1] + index)
        missing = (slots < 0) & ~self.removed[index]
        if bool(missing.any()):
            self._fetch_missing(rows, index, missing)

    def _fetch_missing(self, rows: torch.Tensor, index: torch.Tensor, missing: torch.Tensor) -> None:
        """Cache the `missing` (n, m) pairs of `index`; also the next of each row's ranking
        for rows with fewer than _AHEAD // 2 left beyond their chosen ones."""
        owners, experts = rows[:, None].expand_as(index)[missing], index[missing]
        ahead = self.cache.live - min(self.k, self.alive)
        short = torch.nonzero(ahead < _AHEAD // 2).squeeze(1)
        ranking = self.ranking.index_select(0, short)
        cached = self.cache.slot.index_select(0, short) >= 0  # removed ones are not: freed
        fresh = ~self.removed[ranking] & ~cached.gather(1, ranking)
        take = fresh & (fresh.cumsum(1) <= (_AHEAD - ahead[short])[:, None])
        pick, at = torch.nonzero(take, as_tuple=True)
        self.cache.add(torch.cat([owners, short[pick]]), torch.cat([experts, ranking[pick, at]]))

    def _window(self, rows: torch.Tensor, index: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """_ExpertCache.window of `index` (n, m) (`key`: rows * E + index), the missing outputs
        computed first."""
        slots = _at(self.cache.slot, key)
        missing = (slots < 0) & ~self.removed[index]
        if bool(missing.any()):
            self._fetch_missing(rows, index, missing)
            slots = _at(self.cache.slot, key)
        return self.cache.window_at(rows, slots.clamp_min(0))

    def refresh(self, rows: torch.Tensor) -> None:
        """Evaluate `rows` again: their routing with the experts removed so far and each
        affected trial's, by formula where the router allows it and the row's choice is no
        near-tie, else by the router."""
        if self.strength is None:
            self._store(rows, *self._by_router(rows))
            return
        before = self.top.index_select(0, rows) if self.top is not None else None
        top = self._top(rows)
        # the k-th choice, and the next after one is removed (removed experts tie at -inf,
        # chosen at weight 0)
        a, b = top.values[:, self.k - 1:self.k + 1], top.values[:, self.k:self.k + 2]
        fragile = (_near(a[:, :b.shape[1]], b, self.scale.index_select(0, rows)[:, None])
                   & torch.isfinite(b)).any(1)
        if before is not None and self.alive >= self.k + 2:
            # the (k + 2)-th went: a row the formula evaluated with the same k + 1 keeps its
            # errors (the same experts, strengths and products), and watches the new one
            same = (top.indices[:, :self.k + 1] == before[:, :self.k + 1]).all(1) & \
                self.formula.index_select(0, rows) & ~fragile
            if bool(same.any()):
                kept = rows[same]
                self.depends.view(-1).index_fill_(0, kept * self.value.shape[1] + before[same, -1], False)
                self.depends.view(-1).index_fill_(0, kept * self.value.shape[1] + top.indices[same, -1], True)
                rows, top, fragile = rows[~same], _subset(top, ~same), fragile[~same]
                if rows.numel() == 0:
                    return
        if not bool(fragile.any()):
            self._by_formula(rows, top.indices)
            return
        self._store(rows[fragile], *self._by_router(rows[fragile]))
        if not bool(fragile.all()):
            self._by_formula(rows[~fragile], top.indices[~fragile])

    def _top(self, rows: torch.Tensor):
        """value[rows].topk(k + 2) (the removed at -inf), from the rows' previous best and the
        next few of their ranking where that gives the same answer: a row's experts ranked
        above its previous (k + 2)-th that are left are those previous best still there (a
        removal among them refreshed it), so with distinct scores the k + 2 best are among
        them and the next of the ranking; other rows (ties, too few left there) take topk."""
        width, experts = min(self.k + 2, self.value.shape[1]), self.value.shape[1]
        reach = max(8, 4 * experts // max(self.alive, 1))  # about 4 left among the next `reach`
        if self.top is None or width + reach >= experts // 2:
            top = self.value.index_select(0, rows).topk(width, dim=1)
            if self.top is None:
                self.top = top.indices.new_zeros((self.value.shape[0], width))
            self.top.index_copy_(0, rows, top.indices)
            return top
        old = self.top.index_select(0, rows)
        place = _at(self.where, rows * experts + old[:, -1])[:, None] + \
            torch.arange(1, reach + 1, device=rows.device)
        beyond = place >= experts
        candidates = torch.cat([old, _at(self.ranking, rows[:, None] * experts + place.clamp_max(experts - 1))], 1)
        value = _at(self.value, rows[:, None] * experts + candidates)
        value[:, width:].masked_fill_(beyond, float("-inf"))
        values, at = value.topk(width, dim=1)
        top = torch.return_types.topk((values, candidates.gather(1, at)))
        # too few left among the candidates, or ties: the whole row
        redo = ~self.distinct.index_select(0, rows) | (~torch.isfinite(values[:, -1]) & (self.alive >= width))
        if bool(redo.any()):
            again = self.value[rows[redo]].topk(width, dim=1)
            top.values[redo], top.indices[redo] = again.values, again.indices
        self.top.index_copy_(0, rows, top.indices)
        return top

    def _store(self, rows: torch.Tensor, affected: torch.Tensor, watched: torch.Tensor, now: tuple,
               trials: tuple) -> None:
        """Keep what values() needs: `now` (cross, square, mass) per row, `trials` (row
        position, expert, cross, square, mass) per affected trial."""
        self.affected[rows], self.depends[rows] = affected, watched
        self.formula.index_fill_(0, rows, False)
        (now_cross, now_square, now_mass), (pair, expert, cross, square, mass) = now, trials
        owner = rows[pair]
        energy = self.energy_rows
        if self.effect.rescale:
            self.current[:, rows] = torch.stack([now_cross, now_square, now_mass])
            self.trial[:, owner, expert] = torch.stack([cross, square, mass])
        else:
            error = (energy[rows] - 2 * now_cross + now_square).clamp_min(0)
            trial = (energy[owner] - 2 * cross + square).clamp_min(0)
            self._keep(rows, error, owner, expert, trial - error[pair])

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

    def _by_formula(self, rows: torch.Tensor, top: torch.Tensor) -> None:
        """`rows` (no near-tie, no groups) chose top[:, :k]; removing chosen expert i brings
        in top[:, k], and the weights follow from the strengths (RemovalEffect). With v the
        weights over those k + 1 experts f and y = sum v f, trial i routes to
        a_i (y - v_i f_i) (a_i renormalises), so every trial's products with y_full and its
        own come in closed form from <y_full, f>, <y, f> = G v and ||f||^2 = diag G.
        A softmax router's weights are kept as at no removal (mass: every expert's);
        values() rescales them. Stored here (what _store keeps), the trials as (n, k)."""
        k = self.k
        window = top[:, :k + 1]
        key = rows[:, None] * self.value.shape[1] + window  # flat (row, expert) positions
        cross, block = self._window(rows, window, key)
        v = _at(self.strength, key)
        every = self.alive >= k + 2  # else fewer than k + 2 left: the rest of `top` is removed
        if not every:
            v = v * ~self.removed[window]
        unit = self.unit.index_select(0, rows)[:, None]
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
        self._store_formula(rows, top, every, now_cross, now_square, trial_cross, trial_square)

    def _store_formula(self, rows: torch.Tensor, top: torch.Tensor, every: bool, now_cross: torch.Tensor,
                       now_square: torch.Tensor, trial_cross: torch.Tensor, trial_square: torch.Tensor) -> None:
        """_store for _by_formula's rows: they watch top (their k + 2 best left), the trials of
        their chosen top[:, :k] come as (n, k) (`every`: all of them still there), and the
        writes go through flat positions (index_fill_, index_copy_)."""
        k = self.k
        self.formula.index_fill_(0, rows, True)
        self.depends.index_fill_(0, rows, False)
        self.depends.view(-1).index_fill_(0, (rows[:, None] * self.value.shape[1] + top).view(-1), True)
        owner, expert = rows[:, None], top[:, :k]
        if not every:  # only the trials of chosen experts still there
            pair, slot = torch.nonzero(~self.removed[expert], as_tuple=True)
            owner, expert = rows[pair], expert[pair, slot]
            trial_cross, trial_square = trial_cross[pair, slot], trial_square[pair, slot]
        energy = self.energy_rows
        if self.effect.rescale:
            self.affected[rows] = False
            self.affected[owner, expert] = True
            now_mass = self.mass[rows].sum(1)
            self.current[:, rows] = torch.stack([now_cross, now_square, now_mass])
            mass = now_mass[:, None].expand_as(trial_cross) if every else now_mass[pair]
            self.trial[:, owner, expert] = torch.stack([trial_cross, trial_square, mass])
        else:
            energy = energy.index_select(0, rows)
            error = (energy - 2 * now_cross + now_square).clamp_min(0)
            trial = ((energy[:, None] if every else energy[pair]) - 2 * trial_cross + trial_square).clamp_min(0)
            marks = top[:, :self.k] if every else top[:, :self.k].masked_fill(self.removed[top[:, :self.k]], -1)
            self._keep(rows, error, owner, expert, trial - (error[:, None] if every else error[pair]), marks)

    def _keep(self, rows: torch.Tensor, error: torch.Tensor, owner: torch.Tensor, expert: torch.Tensor,
              delta: torch.Tensor, marks: torch.Tensor | None = None) -> None:
        """Store `rows`' errors and their trials' increments `delta` (at (owner, expert);
        `marks`: each row's experts among them, (n, k), or None when they may be any), the
        sums too."""
        experts, running = self.delta.shape[1], self.delta_sum is not None
        if running:
            self.error_sum += (error - self.error.index_select(0, rows)).sum()
        spread = self.spread.index_select(0, rows)
        if bool(spread.any()):  # clear the whole row
            wide = rows[spread]
            if running:
                self.delta_sum -= self.delta.index_select(0, wide).sum(0)
            self.delta.index_fill_(0, wide, 0)
        if not bool(spread.all()):  # clear its marked entries only
            narrow = rows[~spread]
            old = self.marked.index_select(0, narrow)
            there = old >= 0
            at = (narrow[:, None] * experts + old)[there]
            if running:
                self.delta_sum.index_add_(0, old[there], -self.delta.view(-1).index_select(0, at))
            self.delta.view(-1).index_fill_(0, at, 0)
        self.error.index_copy_(0, rows, error)
        owner, expert = torch.broadcast_tensors(owner, expert)
        self.delta.view(-1).index_copy_(0, (owner * experts + expert).reshape(-1), delta.reshape(-1))
        if running:
            self.delta_sum.index_add_(0, expert.reshape(-1), delta.reshape(-1))
        self.spread.index_fill_(0, rows, marks is None)
        if marks is not None:
            self.marked.index_copy_(0, rows, marks)

    def _scope(self, rows: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(affected, watched) (n, E) bool for `rows` routed to `index` by the router: the
        experts whose removal can re-route the row (every one if the choice is a near-tie),
        and the further ones whose removal changes that answer (the next choices, a group's
        next best)."""
        n, experts = index.shape[0], self.rank.shape[1]
        value = self.value[rows]
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
            running = self.delta_sum is not None
            value = ((self.error_sum + self.delta_sum) if running else (self.error.sum() + self.delta.sum(0))) / rows
        else:  # y scales by the ratio of the softmax masses: ||y_full - c y||^2 per row
            left = self._mass()[:, None] - self.mass  # every row's mass with each expert out too
            # the rows as they are, rescaled (few passes over rows x experts: every step)
            kept = torch.div(self.current[2][:, None], left)
            scale = kept.clone()
            kept.mul_(self.current[1][:, None]).sub_(2 * self.current[0][:, None]).mul_(scale)
            kept.add_(self.energy_rows[:, None]).clamp_min_(0)
            # the affected trials instead, where they are
            row, expert = torch.nonzero(self.affected, as_tuple=True)
            trial = self.trial[:, row, expert]
            scale = trial[2] / left[row, expert]
            kept[row, expert] = (self.energy_rows[row] - 2 * scale * trial[0] + scale ** 2 * trial[1]).clamp_min(0)
            value = kept.sum(0) / rows
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
            self.value[:, best] = float("-inf")
            self.alive -= 1
            self.cache.free(best)
            rows = torch.nonzero(self.depends[:, best]).squeeze(1)
            if rows.numel() and step < experts - 2:
                self.refresh(rows)
        order.append(int(torch.nonzero(~self.removed)[0, 0]))
        errors.append(self.energy)  # nothing left
        return np.array(order, dtype=np.int64), np.nan_to_num(np.array(errors, dtype=np.float64))
