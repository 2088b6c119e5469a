"""Jobs: what is trained (model, data, loss), apart from how (the ``ddp`` library).

``jobs.base.Job`` is the interface; ``jobs.image_classification`` is the
built-in job. Nothing heavy is imported here: torchvision and scikit-learn are
imported only by the builders that need them.
"""
