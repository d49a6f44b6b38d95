"""Self-contained HTML reports: of a trained model on a packed split (``mmcat report``,
:func:`mmcat.report.model.model_report`) and of a packed dataset (``mmcat inspect DIR --html``,
:func:`mmcat.report.dataset.write_dataset_report`)."""
