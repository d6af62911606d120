"""``knnclip demo`` (:mod:`.run`) and its synthetic labelled dataset (:mod:`.synthetic`, and
:mod:`.dataset` for the evaluation protocols' ``--dataset synthetic``)."""
