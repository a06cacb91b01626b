"""Stand-in judges for sweeps in tests: what helpers.staged.staged_sweep needs of a judge (helpers.judges), cheap."""
from helpers.estimators import scores_from


class BrightJudge:
    """A stand-in course judge: each image's mean brightness as its "CLIP-T" (a per-prompt mean, higher is better)."""

    key, kind, columns, reference = "bright", "course", ["clip_t"], {}
    rule = "highest mean brightness (a stand-in for CLIP-T); ties: less guidance"

    def per_prompt(self, images, positions=None):
        return {"clip_t": images.double().mean((1, 2, 3)).numpy()}

    def evaluate(self, images):
        return scores_from(self.kind, self.reference, self.per_prompt(images))

    def rank(self, row):
        return (-row["clip_t"], row["setting"]["guidance"])


class FreshBrightJudge(BrightJudge):
    """The same scores under another key: cells of its own, never the records of a BrightJudge sweep."""

    key = "bright-full"
