fn main() {
    // Programs and the CUDA runtime dlopen "libcuda.so.1"; give the library that soname.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcuda.so.1");
    // Calls between our own functions stay inside the library.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-Bsymbolic-functions");
}
