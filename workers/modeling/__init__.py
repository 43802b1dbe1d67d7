"""How kvorch speaks to a Hugging Face model: the attention interface it registers with
transformers (``attention``) and each layer's rotary embedding (``rope``). Below the presses and
the engine, which both need them; above only workers/contract/.
"""
