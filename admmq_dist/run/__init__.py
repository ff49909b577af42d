"""Running a quantization job: the workers that hold the model and its calibration data on a
device, the backends that run them (in this process, or as Ray actors), the three schedules that
drive them (sequential; depth-parallel; coordinated), the resume folder, and the job that ties
them together (:func:`admmq_dist.run.job.quantize_model`)."""
