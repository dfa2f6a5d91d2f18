module wsbridge.example/receiver

go 1.19
