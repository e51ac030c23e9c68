"""Beam search bookkeeping, independent of the model: transformers 5.23's vectorised beam search, step by step.

The model loop owns the forward pass and the KV cache; :class:`BeamSearchState` owns the hypotheses. A loop looks like::

    state = BeamSearchState.from_config(prompt_ids, gen_config, max_length=max_len)   # prompt_ids: (batch, L)
    input_ids = state.sequences                     # (batch * num_beams, L): every beam starts as the prompt
    attention_mask = mask.repeat_interleave(num_beams, dim=0)
    logits = model(input_ids, attention_mask, cache)[:, -1]          # prefill on the expanded prompt
    while True:
        log_probs = logits_processors(state.sequences, logits.float().log_softmax(-1))
        next_tokens, beam_idx = state.step(log_probs)                 # both (batch * num_beams,)
        if state.is_done():
            break
        cache.reorder(beam_idx)                                      # row r continues former row beam_idx[r]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(beam_idx), 1)], dim=1)
        logits = model(next_tokens[:, None], attention_mask, cache)[:, -1]
    out = state.finalize()  # .sequences (batch * num_return_sequences, L_out), .sequences_scores, .beam_indices

Rows are batch-major: row ``b * num_beams + k`` is beam ``k`` of batch item ``b``, and ``beam_idx`` holds such global
row indices. After ``step``, ``state.sequences`` equals the old sequences gathered by ``beam_idx`` with ``next_tokens``
appended, so a loop without a cache can simply run the model on ``state.sequences`` again.

Semantics (identical to transformers, including its scores and tie-breaking):

- each step keeps the best ``max(2, 1 + len(eos)) * num_beams`` continuations over all beams of a batch item, so that
  ``num_beams`` unfinished ones remain even when the best ones end;
- a continuation that hits a stopping criterion (EOS, ``max_length``, optional extra criteria such as stop strings)
  becomes a finished hypothesis if it ranks among the top ``num_beams`` of the step, scored
  ``sum_logprobs / generated_length ** length_penalty`` (``generated_length`` counts the final token);
- a batch item stops collecting hypotheses once its best running beam, length-normalised, cannot beat its worst
  finished one. The running beam's length is taken as the current one, except with ``early_stopping="never"`` and
  ``length_penalty > 0``, where ``max_length`` (its most favourable length) is used. ``early_stopping=True`` also stops
  it as soon as it has ``num_beams`` finished hypotheses. The search ends when every batch item has stopped or every
  candidate of the step hit a stopping criterion;
- finished sequences are padded with ``pad_token_id`` -- except that, like transformers, a pad id of ``0`` or ``None``
  falls back to the first EOS id, and without EOS the filler is ``-1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch

from decoderkit.generation.stopping import EosTokenCriteria, MaxLengthCriteria, StoppingCriteria, StoppingCriteriaList

if TYPE_CHECKING:
    from decoderkit.generation.config import GenerationConfig

__all__ = ["BeamSearchOutput", "BeamSearchState"]

# transformers' "impossible" score: large enough to rank last, small enough to stay finite when added twice
_NEG = -1.0e9


class BeamSearchOutput(NamedTuple):
    """Best hypotheses, ``num_return_sequences`` per batch item, best first."""

    sequences: torch.Tensor  # (batch * num_return_sequences, out_len), prompt included
    sequences_scores: torch.Tensor  # (batch * num_return_sequences,) length-penalised sum of log-probs
    beam_indices: torch.Tensor  # (batch * num_return_sequences, out_len - prompt_len) row chosen at each step, -1 after


def _gather_beams(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``tensor[b, indices[b, j], ...]`` for a (batch, beams, ...) tensor and (batch, n) indices."""
    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, indices, dim=1)


class BeamSearchState:
    """Hypotheses of a beam search over ``batch`` prompts of equal (padded) length.

    Args:
        prompt_ids: ``(batch, prompt_len)`` prompts, not yet expanded to beams.
        num_beams: beams per batch item.
        max_length: total length (prompt included) at which every hypothesis stops.
        eos_token_id: EOS id or ids, or None.
        pad_token_id: filler after a finished hypothesis (see the module docstring for transformers' fallbacks).
        length_penalty: exponent of the length normalisation; > 0 favours longer hypotheses.
        early_stopping: ``True``, ``False`` or ``"never"``.
        num_return_sequences: hypotheses returned per batch item by :meth:`finalize` (``<= num_beams``).
        do_sample: beam sampling: draw the continuations from the softmax of the accumulated scores instead of
            taking the top ones (``torch.multinomial``, as transformers).
        stopping_criteria: extra criterion (e.g. a :class:`StopStringCriteria` or a :class:`StoppingCriteriaList`),
            called on the ``(rows, cur_len + 1)`` candidate sequences; max length and EOS are always checked.
        generator: random generator for ``do_sample``.
    """

    def __init__(
        self,
        prompt_ids: torch.Tensor,
        *,
        num_beams: int,
        max_length: int,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        length_penalty: float = 1.0,
        early_stopping: bool | Literal["never"] = False,
        num_return_sequences: int = 1,
        do_sample: bool = False,
        stopping_criteria: StoppingCriteria | StoppingCriteriaList | None = None,
        generator: torch.Generator | None = None,
    ):
        if prompt_ids.dim() != 2:
            raise ValueError(f"prompt_ids must be (batch, prompt_len), got shape {tuple(prompt_ids.shape)}")
        batch, prompt_len = prompt_ids.shape
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        if not 1 <= num_return_sequences <= num_beams:
            raise ValueError(f"num_return_sequences must be in [1, num_beams={num_beams}], got {num_return_sequences}")
        if max_length <= prompt_len:
            raise ValueError(f"max_length ({max_length}) must exceed the prompt length ({prompt_len})")
        if early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)

        self.batch_size = batch
        self.num_beams = num_beams
        self.max_length = max_length
        self.prompt_length = prompt_len
        self.cur_len = prompt_len
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.num_return_sequences = num_return_sequences
        self.do_sample = do_sample
        self.generator = generator
        criteria = StoppingCriteriaList([MaxLengthCriteria(max_length)])
        if eos:
            criteria.append(EosTokenCriteria(eos))
        if stopping_criteria is not None:
            criteria.append(stopping_criteria)
        self._criteria = criteria

        device = prompt_ids.device
        self._candidates = max(2, 1 + len(eos)) * num_beams
        self._top_beams_mask = torch.arange(self._candidates, device=device) < num_beams
        # transformers computes `pad or eos[0]`, so a pad id of 0 also falls back to the EOS id
        fill = (pad_token_id or eos[0]) if eos else -1

        # (batch, beams, max_length) token buffers: live hypotheses and the best finished ones
        self._running = torch.full((batch, num_beams, max_length), fill, dtype=torch.long, device=device)
        self._running[:, :, :prompt_len] = prompt_ids[:, None, :]
        self._finished = self._running.clone()
        # Only beam 0 starts live, so the first step does not pick the same token from identical beams
        self._running_scores = torch.zeros(batch, num_beams, device=device)
        self._running_scores[:, 1:] = _NEG
        self._finished_scores = torch.full((batch, num_beams), _NEG, device=device)
        self._is_finished = torch.zeros(batch, num_beams, dtype=torch.bool, device=device)
        # per batch item: can a running beam still beat the worst finished hypothesis?
        self._improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
        # (batch, beams, max_new_tokens) global row index each token came from; -1 where nothing was generated
        steps = max_length - prompt_len
        self._running_rows = torch.full((batch, num_beams, steps), -1, dtype=torch.int32, device=device)
        self._finished_rows = self._running_rows.clone()
        self._done = False

    @classmethod
    def from_config(
        cls,
        prompt_ids: torch.Tensor,
        config: GenerationConfig,
        max_length: int,
        stopping_criteria: StoppingCriteria | StoppingCriteriaList | None = None,
        generator: torch.Generator | None = None,
    ) -> BeamSearchState:
        """State for ``config``'s beam settings; ``max_length`` as resolved by ``config.max_length_for``."""
        return cls(
            prompt_ids,
            num_beams=config.num_beams,
            max_length=max_length,
            eos_token_id=config.eos_token_ids or None,
            pad_token_id=config.pad_token_id,
            length_penalty=config.length_penalty,
            early_stopping=config.early_stopping,
            num_return_sequences=config.num_return_sequences,
            do_sample=config.do_sample,
            stopping_criteria=stopping_criteria,
            generator=generator,
        )

    @property
    def sequences(self) -> torch.Tensor:
        """Live hypotheses, ``(batch * num_beams, cur_len)``: the ``input_ids`` logits processors expect."""
        return self._running[:, :, : self.cur_len].flatten(0, 1)

    def is_done(self) -> bool:
        """True once no further step can change the result."""
        return self._done

    def step(self, log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Extends the beams with ``log_probs``, the processed next-token log-probabilities of :attr:`sequences`.

        Args:
            log_probs: ``(batch * num_beams, vocab)`` float tensor.

        Returns:
            ``(next_tokens, beam_idx)``, both ``(batch * num_beams,)`` long: row ``r`` of the next step is the former
            row ``beam_idx[r]`` followed by ``next_tokens[r]``. Reorder the KV cache with ``beam_idx``.
        """
        if self._done:
            raise RuntimeError("beam search is done; call finalize()")
        batch, beams, cur, prompt = self.batch_size, self.num_beams, self.cur_len, self.prompt_length
        if log_probs.shape[0] != batch * beams:
            raise ValueError(f"log_probs has {log_probs.shape[0]} rows, expected batch * num_beams = {batch * beams}")
        vocab = log_probs.shape[-1]

        # 1. Best continuations over all beams of a batch item, by accumulated log-probability
        scores = (log_probs.view(batch, beams, vocab) + self._running_scores[:, :, None]).reshape(batch, -1)
        if self.do_sample:
            flat_idx = torch.multinomial(scores.softmax(dim=-1), self._candidates, generator=self.generator)
            cand_scores = scores.gather(1, flat_idx)
        else:
            cand_scores, flat_idx = torch.topk(scores, k=self._candidates)
        src_beam = flat_idx // vocab
        cand_seqs = _gather_beams(self._running, src_beam)
        cand_seqs[:, :, cur] = flat_idx % vocab
        cand_rows = _gather_beams(self._running_rows, src_beam)
        cand_rows[:, :, cur - prompt] = src_beam + torch.arange(batch, device=src_beam.device)[:, None] * beams

        hits = self._criteria(cand_seqs[:, :, : cur + 1].flatten(0, 1), None).view(batch, self._candidates)

        # 2. Live beams for the next step: the best candidates that did not stop
        live_scores = cand_scores + hits.to(torch.float32) * _NEG
        keep = torch.topk(live_scores, k=beams).indices
        self._running = _gather_beams(cand_seqs, keep)
        self._running_scores = _gather_beams(live_scores, keep)
        self._running_rows = _gather_beams(cand_rows, keep)

        # 3. Finished hypotheses: merge the candidates that stopped among the top `beams` into the best-so-far
        just_finished = hits & self._top_beams_mask[None, :]
        final_scores = cand_scores / ((cur + 1 - prompt) ** self.length_penalty)
        # The additions below mirror transformers term by term so that scores, and topk ties, match bit for bit
        full = self._is_finished.all(dim=-1, keepdim=True) & (self.early_stopping is True)
        final_scores += full.to(torch.float32) * _NEG
        final_scores += (~self._improvable).to(torch.float32) * _NEG
        final_scores += (~just_finished) * _NEG
        merged_scores = torch.cat((self._finished_scores, final_scores), dim=1)
        best = torch.topk(merged_scores, k=beams).indices
        self._finished = _gather_beams(torch.cat((self._finished, cand_seqs), dim=1), best)
        self._finished_scores = _gather_beams(merged_scores, best)
        self._finished_rows = _gather_beams(torch.cat((self._finished_rows, cand_rows), dim=1), best)
        self._is_finished = _gather_beams(torch.cat((self._is_finished, just_finished), dim=1), best)

        self.cur_len = cur + 1
        self._update_improvable()
        any_improvable = bool(self._improvable.any())
        all_full = bool(self._is_finished.all()) and self.early_stopping is True
        self._done = not any_improvable or all_full or bool(hits.all())

        next_tokens = self._running[:, :, cur].flatten()
        beam_idx = self._running_rows[:, :, cur - prompt].flatten().long()
        return next_tokens, beam_idx

    def _update_improvable(self) -> None:
        # Length at which the best running beam is assumed to end: its current one, except with "never" and a
        # positive length penalty, where growing to max_length is the most favourable case
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_length = self.max_length - self.prompt_length
        else:
            best_length = self.cur_len - self.prompt_length
        best_running = self._running_scores[:, :1] / (best_length**self.length_penalty)
        worst_finished = torch.where(self._is_finished, self._finished_scores.min(dim=1, keepdim=True).values, _NEG)
        self._improvable = self._improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)

    def finalize(self) -> BeamSearchOutput:
        """The best ``num_return_sequences`` hypotheses per batch item, cropped to the longest one returned."""
        n = self.num_return_sequences
        sequences = self._finished[:, :n].flatten(0, 1)
        scores = self._finished_scores[:, :n].flatten()
        rows = self._finished_rows[:, :n].flatten(0, 1)
        generated = int((rows != -1).sum(dim=1).max())
        return BeamSearchOutput(sequences[:, : self.prompt_length + generated], scores, rows[:, :generated])
