"""Named parts of a secure model program, for measurement hooks (the layer-part breakdown)."""

from __future__ import annotations


class StepHooks:
    """A mixin for the secure drivers: `step_hooks` holds objects with begin(part, ctx) and end(part, ctx)."""

    step_hooks: list

    def _mark(self, part: str, ctx, step):
        """Run one named part of the model, letting measurement hooks time and count it."""
        if not self.step_hooks:
            return step()
        for hook in self.step_hooks:
            hook.begin(part, ctx)
        out = step()
        for hook in self.step_hooks:
            hook.end(part, ctx)
        return out
