"""Collection rules per grant (README "Collection rules"): the rule model and its validation (:mod:`.rules`), the
condition language (:mod:`.expr`), the per-grant rule engine (:mod:`.engine`) and plain-words descriptions
(:mod:`.describe`). A pure core: no I/O."""
