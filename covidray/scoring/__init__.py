"""Scoring an archive: what a run scores (:mod:`.index`), the model it applies
(:mod:`.model`), the parts it writes (:mod:`.parts`), the nightly view and its merge
(:mod:`.nightly`, :mod:`.merge`), the metrics files (:mod:`.metrics_files`) and the fault
points tests use (:mod:`.fault_points`). The Ray pipeline and the ``covidray score`` stage
are in :mod:`covidray.stages.score`."""
