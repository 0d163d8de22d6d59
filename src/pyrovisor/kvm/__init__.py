"""The KVM layer: the only code in pyrovisor that calls ioctl()."""

from pyrovisor.kvm.caps import Cap
from pyrovisor.kvm.system import Kvm, loaded_kvm_modules
from pyrovisor.kvm.vcpu import VcpuFd
from pyrovisor.kvm.vm import VmFd

__all__ = ["Cap", "Kvm", "VcpuFd", "VmFd", "loaded_kvm_modules"]
