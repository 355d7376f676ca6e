"""Stage 0: pretraining the unimodal parts that later stay frozen (tokenizer, causal LM, vision encoder).

Real users bring published weights for these; the ShapesWorld recipe trains small ones from scratch
because nothing can be downloaded here.
"""
