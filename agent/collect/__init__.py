"""Collection rules per grant (CONTRACT §5.1): the rule model and its validation (:mod:`.rules`), the
condition language (:mod:`.expr`), the per-grant rule engine (:mod:`.engine`) and plain-words descriptions
(:mod:`.describe`). A pure core: no I/O."""
