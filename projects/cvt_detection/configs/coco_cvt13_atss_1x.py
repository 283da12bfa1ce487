r"""CvT-13 (or CvT-21) + ATSS on COCO 2017, mmdet's 1x schedule with AdamW.

  python -m projects.cvt_detection.main \
    --config=projects/cvt_detection/configs/coco_cvt13_atss_1x.py:pretrained=cvt-13.msgpack,data_dir=/data/coco \
    --workdir=workdirs/coco_cvt13_atss_1x

Arguments: variant (13, 21), pretrained (a `cvt-convert`ed checkpoint), data_dir (holding
train2017/, val2017/ and annotations/), runlocal.

mmdet's atss_r50_fpn_1x_coco.py with its transformer backbones' AdamW: resize to fit (1333,
800), flip, batch 16, lr 1e-4, weight decay 0.05, 500 warmup steps, 12 epochs with x0.1
after epochs 8 and 11, drop path 0.1; COCO box AP on val2017.
"""

from projects.cvt_detection.configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, variant='13', pretrained='', data_dir='', runlocal=False)
  config = common.base_config('cvt_atss', 'coco')
  config.experiment_name = f'coco_cvt{args.variant}_atss_1x'
  config.model.backbone.update(variant=f'cvt-{args.variant}', pretrained=args.pretrained)
  config.dataset_configs = dict(data_dir=args.data_dir, scale=(1333, 800), flip_prob=0.5,
                                max_boxes=100, num_workers=4, validate='full')
  if args.runlocal:
    common.apply_runlocal(config)
  config.lock()
  return config
