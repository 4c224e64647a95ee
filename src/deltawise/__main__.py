from deltawise.launch import main

# guarded: worker processes started with spawn (bam --executor local, lr-sweep --jobs) import this module again
if __name__ == "__main__":
    main()
