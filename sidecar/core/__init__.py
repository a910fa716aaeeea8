"""The pure decision core: models, windows, money and the decision rule. No I/O here."""
