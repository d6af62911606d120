"""Text for FC-CLIP's classifier: CLIP's BPE tokenizer (:mod:`.tokenizer`), the prompt templates and
synonyms (:mod:`.prompts`), and the bank of text-classifier rows cached per synonym (:mod:`.textbank`)."""
