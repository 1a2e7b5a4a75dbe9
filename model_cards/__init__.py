"""Model card templates, installed as ``fipo_trl.model_cards`` (rendered by ``fipo_trl.tools.model_card``)."""
