int main() { return 0; }  // placeholder: bench_connect_rate is being written
