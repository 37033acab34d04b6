def command(cfg, record):
    raise NotImplementedError
