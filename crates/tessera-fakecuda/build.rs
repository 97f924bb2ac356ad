fn main() {
    // Programs (and the CUDA runtime) dlopen "libcuda.so.1"; give the library that soname.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcuda.so.1");
    // Calls between the driver's own functions stay inside it, as in NVIDIA's: an interposing
    // library (Tessera's slice library) sees each call from a program once, never again from
    // the driver's internals (cuMemAllocAsync_ptsz calling cuMemAllocAsync, say).
    println!("cargo:rustc-cdylib-link-arg=-Wl,-Bsymbolic-functions");
}
