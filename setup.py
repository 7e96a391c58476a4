from configparser import ConfigParser
from pathlib import Path
import setuptools, shlex, shutil
from setuptools.command.build_py import build_py

# note: all settings are in settings.ini; edit there, not here
config = ConfigParser(delimiters=['='])
config.read('settings.ini', encoding='utf-8')
cfg = config['DEFAULT']

cfg_keys = 'version description keywords author author_email'.split()
expected = cfg_keys + "lib_name user branch license status min_python audience language".split()
for o in expected: assert o in cfg, "missing expected setting: {}".format(o)
setup_cfg = {o:cfg[o] for o in cfg_keys}

licenses = {'apache2': 'Apache-2.0', 'mit': 'MIT'}  # SPDX expressions (classifiers for licences are deprecated)
statuses = [ '1 - Planning', '2 - Pre-Alpha', '3 - Alpha',
    '4 - Beta', '5 - Production/Stable', '6 - Mature', '7 - Inactive' ]
py_versions = '3.10 3.11 3.12 3.13'.split()

req = lambda key: shlex.split(cfg.get(f'{key}_requirements' if key else 'requirements', ''))
requirements = req('')
min_python = cfg['min_python']
lic = licenses.get(cfg['license'].lower(), cfg['license'])

# Extras, composed so that each install line is one extra: `predict` needs nothing beyond the core (ONNX Runtime);
# `course` is everything the notebooks use, with the TensorFlow build each platform has wheels for; `gpu` swaps in
# TensorFlow with CUDA (Linux); `jax-gpu` adds a CUDA build of JAX; `dev` adds the tests and the docs tools.
train = req('train') + req('tensorflow')
course = train + req('notebook') + req('app') + req('archive')
extras = {
    'train': train, 'app': req('app'), 'archive': req('archive'), 'course': course,
    'gpu': req('train') + req('gpu') + req('notebook') + req('app') + req('archive'),
    'jax-gpu': course + req('jax_gpu'), 'docs': req('docs'),
    'dev': course + req('docs') + req('dev'),
}


class build_py_with_course(build_py):
    "Put the course notebooks, the docs sources and the home-page figure into the package, so a wheel can run the course."
    def run(self):
        super().run()
        if getattr(self, 'editable_mode', False): return  # an editable install uses the repository's own folders
        dest = Path(self.build_lib) / cfg['lib_path'] / '_course'
        for folder, pattern in (('nbs', '*.ipynb'), ('docs', '*.*')):
            (dest / folder).mkdir(parents=True, exist_ok=True)
            for f in Path(folder).glob(pattern):
                if f.is_file(): shutil.copy(f, dest / folder / f.name)
        (dest / 'Bone_age_prediction').mkdir(exist_ok=True)
        shutil.copy('Bone_age_prediction/phantom_vs_real.png', dest / 'Bone_age_prediction')


setuptools.setup(
    name = cfg['lib_name'],
    license = lic,
    license_files = ['LICENSE'],
    classifiers = [
        'Development Status :: ' + statuses[int(cfg['status'])],
        'Intended Audience :: ' + cfg['audience'].title(),
        'Natural Language :: ' + cfg['language'].title(),
    ] + ['Programming Language :: Python :: '+o for o in py_versions[py_versions.index(min_python):]],
    url = cfg['git_url'],
    packages = setuptools.find_packages(include=['boneage', 'boneage.*']),
    include_package_data = True,
    install_requires = requirements,
    extras_require = extras,
    cmdclass = {'build_py': build_py_with_course},
    dependency_links = cfg.get('dep_links','').split(),
    python_requires  = '>=' + cfg['min_python'],
    long_description = open('README.md', encoding='utf-8').read(),
    long_description_content_type = 'text/markdown',
    zip_safe = False,
    entry_points = {
        'console_scripts': cfg.get('console_scripts','').split(),
        'nbdev': [f'{cfg.get("lib_path")}={cfg.get("lib_path")}._modidx:d']
    },
    **setup_cfg)
